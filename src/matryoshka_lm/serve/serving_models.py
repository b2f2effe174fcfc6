"""The model field: NAME:SIZE, NAME:SPEC, a cell (NAME:M@int4) or NAME:auto[@KNOB], resolved once per request
into a Target; the cards /v1/models lists; routing NAME:auto to a size; the speculative draft field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from matryoshka_lm.core import precision
from matryoshka_lm.core.quant import weight_bytes
from matryoshka_lm.core.spec import SubmodelSpec, count_params, format_spec, parse_spec, uniform_spec
from matryoshka_lm.errors import MatryoshkaError
from matryoshka_lm.infer.router import Router
from matryoshka_lm.infer.speculative import check_draft

from .errors import APIError
from .metrics import size_label
from .protocol import ModelCard, ModelList
from .state import State


@dataclass(frozen=True)
class Target:
    """What a model field resolved to: the id that serves it and its spec (a cell carries its bits)."""

    id: str  # NAME:SPEC, canonical; what replies name in `model`
    spec: SubmodelSpec
    auto: bool = False  # the field named NAME:auto (embeddings and unrouted servers: the full size)
    tau: float | None = None  # NAME:auto with a router, before routing: the tolerance to route the prompts at
    cost: float | None = None  # NAME:auto after routing: the chosen size's work per token, the full size's = 1
    overhead: float = 0.0  # and the router's own work, in full-size token-passes (a prefill it did not reuse)


@dataclass(frozen=True)
class Routed:
    """A target after routing, and the router's prefill when the row decodes on from it."""

    target: Target
    prefilled: Any = None


class Models:
    """The sizes, cells and NAME:auto one server answers to."""

    def __init__(self, state: State, router: Router | None = None, bits: list[int] | None = None):
        self.state, self.name, self.cfg, self.model = state, state.name, state.cfg, state.model
        self.router = router
        self.auto = self._full_size()
        self.bits = self._served_bits(bits)
        # the router's candidates, checked against this model now rather than at the first auto request
        self.router_specs = [] if router is None else [state.engine.check_spec(s) for s in router.specs(self.cfg)]

    def _full_size(self) -> SubmodelSpec:
        """auto = the full model, by its size name when one size is the full model."""
        full = self.model.full
        for name in self.state.sizes:
            spec = uniform_spec(self.cfg, name)
            if (spec.width, spec.layers) == (full.width, full.layers):
                return spec
        return full

    def _served_bits(self, bits: list[int] | None) -> list[int]:
        """The bit widths /v1/models lists: those given, else for a quantized checkpoint its stored width's
        narrower MatQuant widths (int4, int2), for a full-precision one int8/int4/int2 (round-to-nearest)."""
        if bits is not None:
            for b in bits:
                precision.check_bits(self.model, b)
            return bits
        stored = self.model.precision.code_bits if self.model.precision.has_codes else None
        return [b for b in (8, 4, 2) if stored is None or b < stored]

    # ---- the model field

    def ids(self) -> list[str]:
        """Every size, every listed cell (size@intR) and auto; any other spec or cell is served too."""
        sizes = self.state.sizes
        cells = [f"{self.name}:{s}@int{b}" for b in self.bits for s in sizes]
        return [f"{self.name}:{s}" for s in sizes] + cells + [f"{self.name}:auto"]

    def _not_found(self, model: str) -> APIError:
        return APIError(
            404,
            f"The model '{model}' does not exist; this server has {', '.join(self.ids())} "
            f"or {self.name}:SPEC for any Mix'n'Match spec.",
            "model",
            "model_not_found",
        )

    def resolve(self, model: str) -> Target:
        """NAME:SIZE | NAME:SPEC | NAME:auto[@KNOB] | SIZE | SPEC -> its Target. An unknown name is a 404, a bad
        spec or routing setting a 400 on `model`."""
        prefix, colon, size = model.rpartition(":")  # spec strings never contain ':'
        if colon and prefix != self.name:
            raise self._not_found(model)
        base, at, knob = size.partition("@")
        if base == "auto":
            return Target(self._id(self.auto), self.auto, True, self._auto_tau(model, knob if at else None))
        try:
            spec = parse_spec(self.cfg, size)
            precision.check_bits(self.model, spec.bits)
        except MatryoshkaError as e:
            if colon:
                raise APIError(400, f"Invalid size spec in model '{model}': {e}", "model", "invalid_model") from None
            raise self._not_found(model) from None
        return Target(self._id(spec), spec)

    def _id(self, spec: SubmodelSpec) -> str:
        return f"{self.name}:{format_spec(spec)}"

    def _auto_tau(self, model: str, knob: str | None) -> float | None:
        """The τ of NAME:auto (the router's default), NAME:auto@T, NAME:auto@tau=T or NAME:auto@budget=F; None
        without a router. A bad setting is a 400 naming the model field."""

        def bad(why: str) -> APIError:
            return APIError(400, f"Invalid routing setting in model '{model}': {why}.", "model", "invalid_model")

        if self.router is None:
            if knob is not None:
                raise bad(f"no router is saved beside this checkpoint, so {self.name}:auto is the full size")
            return None
        if knob is None:
            return self.router.tolerance
        field, eq, value = knob.rpartition("=")
        field = field if eq else "tau"
        if field not in ("tau", "budget"):
            raise bad(f"unknown setting '{field}'; use {self.name}:auto@T, @tau=T or @budget=F")
        try:
            x = float(value)
        except ValueError:
            raise bad(f"{field} must be a number, got '{value}'") from None
        if field == "tau":
            if not x >= 0:  # also NaN
                raise bad(f"tau must be a number >= 0 (nats per token), got '{value}'")
            return x
        if not 0 < x <= 1:
            raise bad(f"budget must be a mean compute fraction in (0, 1] (1 = always the full size), got '{value}'")
        try:
            return self.router.tau_for_budget(x)
        except MatryoshkaError as e:
            raise bad(str(e)) from None

    def draft(self, draft: str | None, target: Target) -> SubmodelSpec | None:
        """A request's speculative draft, checked against the size that serves it; None without one."""
        if draft is None:
            return None
        if target.tau is not None:
            raise APIError(
                400, "'draft' does not combine with NAME:auto: name the size to verify.", "draft", "invalid_value"
            )
        try:
            spec = self.state.engine.check_spec(parse_spec(self.cfg, draft))
            check_draft(self.cfg, target.spec, spec)
        except MatryoshkaError as e:
            raise APIError(400, f"Invalid value for 'draft': {e}", "draft", "invalid_value") from None
        return spec

    async def route(self, target: Target, prompts: list[list[int]], max_tokens: int, alone: bool) -> Routed:
        """The size that serves a routed NAME:auto, each prompt routed by one small-size prefill on the worker
        thread; counted in the auto-choice metric. One prompt and one plain choice (`alone`): when the router picks
        the size it prefilled with, that prefill is kept for decoding on (infer.routed.route_with_prefill). Several:
        the largest any of them needs (one response names one size), and each row prefills again at that size."""
        from matryoshka_lm.infer.routed import route_with_prefill
        from matryoshka_lm.infer.router import CHEAP, route

        if target.tau is None:
            return Routed(target)
        router, tau, engine = self.router, target.tau, self.state.engine
        assert router is not None

        def choose() -> tuple[int, Any]:
            if alone:
                decision, prefilled = route_with_prefill(engine, router, prompts[0], max_tokens, tau)
                return decision.index, prefilled
            x = [torch.tensor(p, device=engine.device) for p in prompts]
            return max(route(self.model, ids, router, tolerance=tau).index for ids in x), None

        index, prefilled = await self.state.batcher.call(choose)
        spec = self.router_specs[index]
        self.state.metrics.auto_choices.labels(size_label(spec)).inc()
        # the small size's prefill is the router's price unless decoding went on from it; the cheap router runs none
        paid = router.default != CHEAP and prefilled is None
        overhead = router.costs[0] * sum(len(p) for p in prompts) if paid else 0.0
        return Routed(Target(self._id(spec), spec, auto=True, cost=router.costs[index], overhead=overhead), prefilled)

    # ---- /v1/models

    def card(self, target: Target) -> ModelCard:
        spec = target.spec
        routed = target.auto and self.router is not None
        bits = spec.bits or self.model.precision.native_bits
        return ModelCard(
            id=f"{self.name}:auto" if target.auto else target.id,
            created=self.state.created,
            size="auto" if routed else format_spec(spec),
            params=count_params(self.cfg, spec)["total"],  # auto: the most it uses
            bits=bits,
            weight_bytes=weight_bytes(self.cfg, spec, bits, self.model.precision.quant),
            context_length=self.cfg.max_seq_len,
            trained=self._trained(spec) or routed,
            **(self._auto_card() if target.auto else {}),
        )

    def _trained(self, spec) -> bool:
        """A named size nothing trained is marked; a Mix'n'Match spec is, when any size is."""
        untrained = self.state.untrained
        return spec.name not in untrained if spec.name else not untrained

    def _auto_card(self) -> dict:
        """What /v1/models says about NAME:auto: routed (by which router) or always the full size."""
        if self.router is None:
            full = format_spec(self.auto)
            return {"description": f"the full size ({full}): no router is saved beside this checkpoint", "router": None}
        r = self.router
        return {
            "description": f"the smallest of {', '.join(r.candidates)} each prompt needs, as the router predicts",
            "router": {"candidates": r.candidates, "kind": r.default, "tolerance": r.tolerance},
        }

    def listing(self) -> ModelList:
        return ModelList(data=[self.card(self.resolve(m)) for m in self.ids()])
