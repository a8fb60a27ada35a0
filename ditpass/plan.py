"""The parallel plan: one frozen config that says how a DiT run is split over processes.

A ``Plan`` holds degrees (how many processes share each kind of work) and per-module
choices. It knows nothing of the model or of process groups; ``validate`` checks it against
a world size and, where given, the model's head and block counts, and every error says which
field to change and to what. ``ditpass.mesh.ParallelDims`` turns a validated plan into a
``DeviceMesh``.

Degrees multiply: ``world_size = dp * cfg * pipefusion * ring * ulysses``.

Per-module overrides
--------------------
``overrides`` is a tuple of ``(glob, dict)`` pairs. A glob matches a module path (the dotted
name from ``named_modules()``, e.g. ``transformer_blocks.7.attn``) when ``fnmatch.fnmatchcase``
matches the path itself or one of its dotted prefixes, so ``"transformer_blocks.0"`` covers
everything inside block 0. ``*`` also matches dots. Precedence: entries are applied in order
and **a later entry wins** over an earlier one for the same key; there is no ranking by how
specific a glob is. Keys not set by any matching entry fall back to the plan-wide setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import PlanError

__all__ = ["Plan", "PlanError", "COMPILE_BACKENDS", "ATTENTION_BACKENDS", "OVERRIDE_KEYS"]

COMPILE_BACKENDS = ("eager", "inductor", "nexfort")
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math", "fa3")
STEP_CACHE_METHODS = ("fbcache", "taylorseer")
CHECK_INPUTS = ("first", "always", "off")
# key -> type its value must have in an override dict
OVERRIDE_KEYS = {"sequence_parallel": bool, "fastattn": bool, "attention": str}
# Mesh axes, outer to inner; the order of the degree product everywhere.
DEGREES = ("dp", "cfg", "pipefusion", "ring", "ulysses")


@dataclass(frozen=True)
class Plan:
    """How to split one DiT inference run over processes.

    >>> print(Plan(cfg=2, ulysses=2))
    Plan(cfg=2, ulysses=2)
    >>> Plan(cfg=2, ulysses=2).world_size
    4
    """

    # processes that each run whole requests (different prompts/batch entries); 1 = off
    dp: int = 1
    # processes that split the conditional/unconditional CFG halves: 1 = off, 2 = one half each
    cfg: int = 1
    # PipeFusion pipeline stages, each holding 1/N of the transformer blocks; 1 = off
    pipefusion: int = 1
    # patches the latent's tokens are cut into for PipeFusion; None = the pipefusion degree
    patches: int | None = None
    # diffusion steps run synchronously (no stale K/V) before PipeFusion pipelines; 0 = none
    warmup_steps: int = 1
    # transformer blocks per PipeFusion stage, in order (e.g. (10, 9)); None = balanced by parameters
    stage_blocks: tuple[int, ...] | None = None
    # inside a diffusers pipeline, PipeFusion pipelines across diffusion steps (stage 0 starts step t+1
    # while later stages finish step t; ditpass/runtime/lazy.py); False = fill and drain in every call
    across_steps: bool = True
    # processes in ring attention (sequence split, K/V passed around a ring); 1 = off
    ring: int = 1
    # processes in Ulysses attention (sequence split, all-to-all to split heads); 1 = off
    ulysses: int = 1
    # DiTFastAttn: None/False = off, True = calibrate a plan now, str = path of a saved plan
    fastattn: bool | str | None = None
    # DiTFastAttn's calibration bound: relative L1 error of the transformer output per step, scaled by
    # (site index + 1) / sites; 0 = full attention everywhere (ditpass/runtime/fastattn.py)
    fastattn_threshold: float = 0.05
    # DiTFastAttn's window (WA-RS): the share of the sequence each query sees, half before and half after
    fastattn_window: float = 0.125
    # DiTFastAttn's calibration inputs (prompts or class labels), each run through the whole denoising loop
    fastattn_calib: int = 4
    # step caching: None = off, "fbcache" (reuse the middle blocks' residual of the last computed step) or
    # "taylorseer" (forecast it from the last computed steps); ditpass/runtime/step_cache.py
    step_cache: str | None = None
    # the step cache recomputes when the first blocks' residual changed by at least this much (relative L1
    # against the last computed step, all ranks alike); 0 = every step computed (exact)
    cache_threshold: float = 0.08
    # transformer blocks always computed before the cached ones (their residual decides); >= 1
    cache_first_blocks: int = 1
    # transformer blocks always computed after the cached ones; 0 = none
    cache_last_blocks: int = 0
    # diffusion steps at the start of each generation that always compute; 0 = only the first
    cache_warmup_steps: int = 1
    # most consecutive steps that may reuse the cache before one computes again; >= 1
    cache_max_skip: int = 3
    # TaylorSeer's forecast order: 0 = the last residual, 1 = linear, 2 = quadratic in the step index
    cache_order: int = 1
    # graph backend: "eager" (no compile), "inductor" (torch.compile), "nexfort" (onediff's compiler)
    compile: str = "eager"
    # attention kernel: "auto" = FlashAttention-3 where installed on a Hopper GPU (bf16, no mask), else torch's SDPA
    # choice; "flash", "efficient", "cudnn" or "math" = that SDPA kernel; "fa3" = FlashAttention-3 wherever it
    # computes the call exactly, SDPA elsewhere (pip install 'ditpass[fa3]'; ditpass/runtime/fa3.py)
    attention: str = "auto"
    # merge the linear layers of one block that read the same input (q/k/v, and FLUX's MLP-in)
    # into one matrix product: bigger GEMMs, fewer launches; equal within rounding (passes/fuse_projections.py)
    fuse_projections: bool = False
    # replay each input signature's whole step as one CUDA graph (collectives captured): removes
    # the per-op launch cost of host-bound steps; CUDA only, static shapes (ditpass/backend/cudagraph.py)
    cuda_graphs: bool = False
    # decode with the VAE's feature maps in row bands over all ranks (halo rows exchanged before each
    # convolution, group norm statistics all-reduced; exact): less memory per GPU at high resolution
    # (passes/parallel_vae.py)
    vae: bool = False
    # check that every rank called the model with the same inputs (shapes, other arguments, a checksum of
    # each tensor; one small all-gather): "first" = on the first call of each input signature, "always" =
    # every call, "off"
    check_inputs: str = "first"
    # ((module-path glob, {key: value}), ...) per-module settings; later wins (see module doc)
    overrides: tuple[tuple[str, dict], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "overrides", _normalize_overrides(self.overrides))
        if isinstance(self.stage_blocks, list):
            object.__setattr__(self, "stage_blocks", tuple(self.stage_blocks))
        if isinstance(self.fastattn, os.PathLike):
            object.__setattr__(self, "fastattn", os.fspath(self.fastattn))
        self._check_fields()

    def __hash__(self):
        # The override dicts are not hashable; hash a frozen view of them instead.
        frozen = tuple((g, tuple(sorted(d.items()))) for g, d in self.overrides)
        return hash(
            tuple(frozen if f.name == "overrides" else getattr(self, f.name) for f in _FIELDS)
        )

    def __str__(self):
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in _FIELDS
            if getattr(self, f.name) != f.default
        ]
        return f"Plan({', '.join(parts)})"

    # ---- derived sizes -------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Processes this plan needs: dp * cfg * pipefusion * ring * ulysses."""
        return math.prod(getattr(self, d) for d in DEGREES)

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: ring * ulysses."""
        return self.ring * self.ulysses

    @property
    def num_patches(self) -> int:
        """Patches PipeFusion cuts the latent into; 1 when PipeFusion is off."""
        return self.patches if self.patches is not None else self.pipefusion

    # ---- per-module overrides ------------------------------------------------------------

    def override_for(self, module_path: str) -> dict:
        """The override keys that apply to ``module_path``, later entries winning.

        Only keys some matching entry sets are returned; the caller falls back to the plan-wide
        field for the rest.

        >>> p = Plan(overrides=(("transformer_blocks.*", {"fastattn": False}),
        ...                     ("transformer_blocks.0", {"fastattn": True})))
        >>> p.override_for("transformer_blocks.0.attn"), p.override_for("transformer_blocks.1")
        ({'fastattn': True}, {'fastattn': False})
        """
        prefixes = _dotted_prefixes(module_path)
        merged: dict = {}
        for glob, settings in self.overrides:
            if any(fnmatch.fnmatchcase(p, glob) for p in prefixes):
                merged.update(settings)
        return merged

    # ---- validation ----------------------------------------------------------------------

    def validate(
        self,
        world_size: int | None = None,
        *,
        heads: int | None = None,
        num_blocks: int | None = None,
    ) -> Plan:
        """Check the plan against a world size and the model; return ``self`` or raise PlanError.

        ``heads``: attention heads per layer; ``num_blocks``: transformer blocks that PipeFusion
        may cut between. A head count that ``ulysses`` does not divide is allowed (the pass
        pads the heads), but more Ulysses processes than heads needs ring attention.
        """
        self._check_fields()
        for name, value in (("heads", heads), ("num_blocks", num_blocks)):
            if value is not None and (not _is_int(value) or value < 1):
                raise PlanError(f"{name}={value!r}: must be an int >= 1 (or None if unknown)")
        if heads is not None:
            if self.ring == 1 and self.ulysses > heads:
                u = math.gcd(self.ulysses, heads)
                raise PlanError(
                    f"ulysses={self.ulysses} splits attention heads, but the model has only "
                    f"{heads} heads: move the rest to ring attention, which splits the sequence "
                    f"instead, e.g. ulysses={u}, ring={self.ulysses // u}"
                )
        if num_blocks is not None and self.pipefusion > num_blocks:
            raise PlanError(
                f"pipefusion={self.pipefusion} needs at least {self.pipefusion} transformer "
                f"blocks (one stage holds whole blocks) but the model has num_blocks={num_blocks}: "
                f"set pipefusion to at most {num_blocks}"
            )
        cached = num_blocks - self.cache_first_blocks - self.cache_last_blocks if num_blocks is not None else 1
        if self.step_cache is not None and cached < 1:
            raise PlanError(
                f"cache_first_blocks={self.cache_first_blocks} + cache_last_blocks={self.cache_last_blocks} leave no "
                f"block to cache in a model with num_blocks={num_blocks}: keep their sum below {num_blocks}"
            )
        if world_size is not None:
            if not _is_int(world_size) or world_size < 1:
                raise PlanError(f"world size must be an int >= 1, got {world_size!r}")
            if world_size != self.world_size:
                degrees = ", ".join(f"{d}={getattr(self, d)}" for d in DEGREES)
                one_change = self._suggest_one_degree(world_size, heads, num_blocks)
                if one_change is not None:
                    fix = f"change a degree so the product is {world_size}, e.g. {one_change}"
                elif world_size == 1:
                    fix = "set every degree to 1, i.e. Plan()"
                else:
                    name = "ulysses" if heads is None or world_size <= heads else "ring"
                    fix = (
                        f"change the degrees so the product is {world_size}, "
                        f"e.g. Plan({name}={world_size})"
                    )
                raise PlanError(
                    f"Plan({degrees}) needs {self.world_size} processes "
                    f"({'*'.join(DEGREES)} = {'*'.join(str(getattr(self, d)) for d in DEGREES)}) "
                    f"but the world size is {world_size}: {fix}"
                )
        return self

    def _check_fields(self):
        for name in DEGREES:
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise PlanError(
                    f"{name}={value!r}: every degree must be an int >= 1 (1 turns it off)"
                )
        if self.cfg not in (1, 2):
            fix = (
                f"e.g. cfg=2, dp={self.dp * self.cfg // 2} for the same world size"
                if self.cfg % 2 == 0
                else "set cfg=1 or cfg=2"
            )
            raise PlanError(
                f"cfg={self.cfg}: classifier-free guidance has two halves (conditional, "
                f"unconditional), so cfg must be 1 (off) or 2: {fix}"
            )
        if self.patches is not None:
            if not _is_int(self.patches) or self.patches < 1:
                raise PlanError(
                    f"patches={self.patches!r}: must be an int >= 1, or None for "
                    f"patches = pipefusion"
                )
            if self.pipefusion == 1:
                raise PlanError(
                    f"patches={self.patches} is only used by PipeFusion, which is off "
                    f"(pipefusion=1): set pipefusion > 1 or drop patches"
                )
            if self.patches < self.pipefusion:
                raise PlanError(
                    f"patches={self.patches} < pipefusion={self.pipefusion}: every pipeline "
                    f"stage needs a patch in flight, set patches >= {self.pipefusion} (or None)"
                )
        if self.stage_blocks is not None:
            sb = self.stage_blocks
            if not isinstance(sb, tuple) or not sb or not all(_is_int(b) and b >= 1 for b in sb):
                raise PlanError(f"stage_blocks={sb!r}: give the blocks of each PipeFusion stage as ints >= 1, "
                                f"e.g. (10, 9), or None to balance by parameters")
            if len(sb) != self.pipefusion:
                raise PlanError(f"stage_blocks={sb!r} lists {len(sb)} stages but pipefusion={self.pipefusion}: "
                                f"give one count per stage")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise PlanError(
                f"warmup_steps={self.warmup_steps!r}: must be an int >= 0 (0 = no warm-up)"
            )
        if not (self.fastattn is None or isinstance(self.fastattn, (bool, str))):
            raise PlanError(
                f"fastattn={self.fastattn!r}: use None or False (off), True (calibrate) or "
                f"the path of a saved fastattn plan"
            )
        if self.fastattn == "":
            raise PlanError("fastattn='': give the path of a saved fastattn plan, True or None")
        self._check_fastattn()
        self._check_step_cache()
        _check_choice("compile", self.compile, COMPILE_BACKENDS)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise PlanError(f"{name}={getattr(self, name)!r}: must be True or False")
        _check_choice("attention", self.attention, ATTENTION_BACKENDS)
        _check_choice("check_inputs", self.check_inputs, CHECK_INPUTS)
        for glob, settings in self.overrides:
            for key, value in settings.items():
                if key not in OVERRIDE_KEYS:
                    raise PlanError(
                        f"override {glob!r}: unknown key {key!r}"
                        f"{_did_you_mean(key, OVERRIDE_KEYS)}; valid keys: {', '.join(OVERRIDE_KEYS)}"
                    )
                if not isinstance(value, OVERRIDE_KEYS[key]):
                    raise PlanError(
                        f"override {glob!r}: {key}={value!r} must be a "
                        f"{OVERRIDE_KEYS[key].__name__}"
                    )
                if key == "attention":
                    _check_choice(f"override {glob!r}: attention", value, ATTENTION_BACKENDS)

    def _check_fastattn(self):
        t, w, n = self.fastattn_threshold, self.fastattn_window, self.fastattn_calib
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t < math.inf):
            raise PlanError(f"fastattn_threshold={t!r}: a number >= 0 (the relative error allowed per step; "
                            f"0 = full attention everywhere), e.g. 0.05")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 < w <= 1):
            raise PlanError(f"fastattn_window={w!r}: the share of the sequence the window covers, in (0, 1], "
                            f"e.g. 0.125 (xDiT's --window_size counts tokens; here it is a fraction)")
        if not _is_int(n) or n < 1:
            raise PlanError(f"fastattn_calib={n!r}: the number of calibration inputs, an int >= 1")
        if not self.fastattn:
            changed = [f"{name}={getattr(self, name)!r}" for name in _FASTATTN_FIELDS
                       if getattr(self, name) != _DEFAULTS[name]]
            if changed:
                raise PlanError(f"{', '.join(changed)} only matter(s) to DiTFastAttn, which is off: set "
                                f"fastattn=True (calibrate) or fastattn='plan.json', or drop them")
        if self.fastattn and self.cuda_graphs:
            raise PlanError("fastattn with cuda_graphs=True: DiTFastAttn runs other kernels at each step, which one "
                            "recorded graph cannot replay; set cuda_graphs=False")

    def _check_step_cache(self):
        if self.step_cache is not None:
            _check_choice("step_cache", self.step_cache, STEP_CACHE_METHODS)
        t = self.cache_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t < math.inf):
            raise PlanError(f"cache_threshold={t!r}: a number >= 0 (the relative L1 change of the first blocks' "
                            f"residual below which a step reuses the cache; 0 = every step computed), e.g. 0.08")
        for name, low in (("cache_first_blocks", 1), ("cache_last_blocks", 0), ("cache_warmup_steps", 0),
                          ("cache_max_skip", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < low:
                raise PlanError(f"{name}={value!r}: must be an int >= {low}")
        if self.cache_order not in (0, 1, 2) or not _is_int(self.cache_order):
            raise PlanError(f"cache_order={self.cache_order!r}: TaylorSeer's forecast order, 0, 1 or 2")
        if self.step_cache is None:
            changed = [f"{name}={getattr(self, name)!r}" for name in _STEP_CACHE_FIELDS
                       if getattr(self, name) != _DEFAULTS[name]]
            if changed:
                raise PlanError(f"{', '.join(changed)} only matter(s) to the step cache, which is off: set "
                                f"step_cache='fbcache' or 'taylorseer', or drop them")
        elif self.step_cache != "taylorseer" and self.cache_order != _DEFAULTS["cache_order"]:
            raise PlanError(f"cache_order={self.cache_order!r} is TaylorSeer's forecast order; "
                            f"step_cache={self.step_cache!r} reuses the last residual: set step_cache='taylorseer' "
                            f"or drop cache_order")
        if self.step_cache is not None and self.cuda_graphs:
            raise PlanError("step_cache with cuda_graphs=True: whether a step runs the middle blocks is decided on "
                            "the host from this step's values, which one recorded graph cannot replay; set "
                            "cuda_graphs=False")

    def _suggest_one_degree(self, world_size, heads, num_blocks) -> str | None:
        """A single degree change that makes the product ``world_size`` and fits the model."""

        def fits(name, value):
            if name == "cfg":
                return value in (1, 2)
            if name == "ulysses":
                return heads is None or value <= heads or self.ring > 1
            if name == "pipefusion":
                return (num_blocks is None or value <= num_blocks) and (
                    self.patches is None or self.patches >= value
                )
            return True

        # Ulysses first: it is the cheapest way to use more processes on one request.
        for name in ("ulysses", "dp", "ring", "cfg", "pipefusion"):
            rest = self.world_size // getattr(self, name)
            if world_size % rest == 0 and fits(name, world_size // rest):
                return f"{name}={world_size // rest}"
        return None

    # ---- construction and serialization ---------------------------------------------------

    def replace(self, **changes) -> Plan:
        """A copy with ``changes`` applied (validated like a new plan)."""
        _check_keys(changes, "Plan.replace")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field as plain JSON-able values; overrides become a list of [glob, dict]."""
        d = {f.name: getattr(self, f.name) for f in _FIELDS}
        d["overrides"] = [[glob, dict(settings)] for glob, settings in self.overrides]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        """Inverse of ``to_dict``; missing keys take their defaults, unknown keys are errors."""
        if not isinstance(d, Mapping):
            raise PlanError(f"a plan must be a mapping of field -> value, got {type(d).__name__}")
        _check_keys(d, "plan")
        return cls(**d)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan JSON does not parse: {e}") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        with open(path) as f:
            return cls.from_json(f.read())

    @classmethod
    def parse(cls, text: str) -> Plan:
        """A plan from a CLI string: ``"ulysses=2,ring=2"``, or the path of a JSON plan.

        Values: ints for degrees, ``none`` for ``patches``/``fastattn``, ``true``/``false``
        for ``fastattn`` (anything else there is a path). Overrides need a JSON file.
        """
        text = text.strip()
        if os.path.isfile(text) or ("=" not in text and text.endswith(".json")):
            return cls.load(text)
        d: dict = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or not key:
                raise PlanError(
                    f"plan item {item!r} is not key=value; write e.g. 'ulysses=2,ring=2' or "
                    f"give the path of a JSON plan"
                )
            _check_keys({key: None}, "plan")
            if key == "overrides":
                raise PlanError("overrides cannot be given inline; put them in a JSON plan file")
            d[key] = _parse_value(key, value)
        return cls(**d)


_FIELDS = dataclasses.fields(Plan)
_FIELD_NAMES = tuple(f.name for f in _FIELDS)
_BOOL_FIELDS = tuple(f.name for f in _FIELDS if f.type == "bool")  # on/off switches: True or False only
_FASTATTN_FIELDS = ("fastattn_threshold", "fastattn_window", "fastattn_calib")
_STEP_CACHE_FIELDS = ("cache_threshold", "cache_first_blocks", "cache_last_blocks", "cache_warmup_steps",
                      "cache_max_skip", "cache_order")
_DEFAULTS = {f.name: f.default for f in _FIELDS}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _did_you_mean(word, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_choice(name, value, choices):
    if value not in choices:
        raise PlanError(
            f"{name}={value!r}{_did_you_mean(str(value), choices)}: choose one of "
            f"{', '.join(map(repr, choices))}"
        )


def _check_keys(keys, what):
    unknown = [k for k in keys if k not in _FIELD_NAMES]
    if unknown:
        hints = "".join(_did_you_mean(str(k), _FIELD_NAMES) for k in unknown)
        raise PlanError(
            f"{what}: unknown field(s) {', '.join(map(repr, unknown))}{hints}; "
            f"valid fields: {', '.join(_FIELD_NAMES)}"
        )


def _normalize_overrides(overrides) -> tuple[tuple[str, dict], ...]:
    """Accept any sequence of (glob, mapping) pairs, or a {glob: mapping} dict; copy the dicts."""
    if isinstance(overrides, Mapping):
        overrides = overrides.items()
    out = []
    try:
        for entry in overrides:
            glob, settings = entry
            if not isinstance(glob, str) or not isinstance(settings, Mapping):
                raise TypeError
            out.append((glob, dict(settings)))
    except (TypeError, ValueError):
        raise PlanError(
            f"overrides={overrides!r}: give a sequence of (module-path glob, dict) pairs, "
            f"e.g. (('transformer_blocks.*', {{'fastattn': False}}),)"
        ) from None
    return tuple(out)


def _dotted_prefixes(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _parse_value(key, value):
    lowered = value.lower()
    if key == "stage_blocks":  # "10:9" (a colon between the stages' block counts), or none
        if lowered == "none":
            return None
        try:
            return tuple(int(v) for v in value.split(":"))
        except ValueError:
            raise PlanError(f"stage_blocks={value!r}: expected block counts separated by ':', e.g. 10:9") from None
    if key in DEGREES or key in ("patches", "warmup_steps"):
        if key == "patches" and lowered == "none":
            return None
        try:
            return int(value)
        except ValueError:
            raise PlanError(f"{key}={value!r}: expected an int") from None
    if key == "fastattn":
        return {"none": None, "false": False, "true": True}.get(lowered, value)
    if key in ("fastattn_threshold", "fastattn_window"):
        try:
            return float(value)
        except ValueError:
            raise PlanError(f"{key}={value!r}: expected a number") from None
    if key == "step_cache":
        return None if lowered in ("none", "off", "false") else lowered
    if key == "cache_threshold":
        try:
            return float(value)
        except ValueError:
            raise PlanError(f"{key}={value!r}: expected a number") from None
    if key == "fastattn_calib" or key in _STEP_CACHE_FIELDS:
        try:
            return int(value)
        except ValueError:
            raise PlanError(f"{key}={value!r}: expected an int") from None
    if key in _BOOL_FIELDS:
        if lowered not in ("true", "false", "1", "0"):
            raise PlanError(f"{key}={value!r}: expected true or false")
        return lowered in ("true", "1")
    return value
