"""Starting the requests one engine iteration admits, with one text-encoder call for all of them.

`tandem.pipeline.start` encodes one request's prompt and negative prompt and builds its schedule;
done per request at admission, that is a text-encoder call and a schedule computation per
newcomer, paid by every running request's next step. `Starter` does the same for a whole
admission at once: one encoder call for every prompt (CLIP pads each to the tokenizer's length,
so a row does not depend on its batch-mates), negative prompts' embeddings cached (nearly every
request has the same one, usually ""), and schedules cached per (sampler, steps). The states it
makes are those `start` makes (tests/test_edge_engine_efficiency.py checks with torch.equal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.lru import Lru
from tandem.packs import ModelPack
from tandem.request import GenerationRequest
from tandem.sampling.denoise import DenoiseState, Guidance, initial_latent
from tandem.sampling.schedule import Schedule, make_schedule


@dataclass(frozen=True)
class Started:
    """One request's start: its state, or why it could not start."""

    state: DenoiseState | None
    error: Exception | None = None


class Starter:
    """`tandem.pipeline.start` for many requests at once (see the module docstring)."""

    def __init__(self, pack: ModelPack, cache_size: int = 64):
        self.pack = pack
        self._negatives: Lru[str, torch.Tensor] = Lru(cache_size)
        self._schedules: Lru[tuple[str, int], Schedule] = Lru(cache_size)
        self.encoder_calls = 0  # text-encoder calls made (what batching saves; tests read it)

    def start(self, requests: list[GenerationRequest]) -> list[Started]:
        """A state at step 0 for each request, in order. If the batched encoding fails, each
        request is encoded alone, so only one whose prompt fails gets an error."""
        if not requests:
            return []
        try:
            guidances = self._guidances(requests)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
            if len(requests) == 1:
                return [Started(None, exc)]
            return [self.start([request])[0] for request in requests]
        return [self._state(request, guidance) for request, guidance in zip(requests, guidances)]

    def _state(self, request: GenerationRequest, guidance: Guidance) -> Started:
        try:
            schedule = self._schedule(request)
            shape = self.pack.latent_shape(request.height, request.width)
            latent = initial_latent(request.seed, shape, schedule).to(self.pack.device)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the others
            return Started(None, exc)
        return Started(DenoiseState(schedule=schedule, step=0, latent=latent, guidance=guidance))

    def _schedule(self, request: GenerationRequest) -> Schedule:
        key = (request.sampler, request.steps)
        schedule = self._schedules.get(key)
        if schedule is None:
            schedule = make_schedule(request.sampler, request.steps, self.pack.sampler_config)
            self._schedules.put(key, schedule)
        return schedule

    @torch.no_grad()
    def _guidances(self, requests: list[GenerationRequest]) -> list[Guidance]:
        """As `tandem.pipeline.encode_prompt` for each request, in one encoder call."""
        normalize = self.pack.manifest.normalize_prompt
        prompts = [normalize(r.prompt) for r in requests]
        negatives = [normalize(r.negative_prompt) if r.guidance_scale != 1.0 else None for r in requests]
        known = {n: row for n in negatives if n is not None and (row := self._negatives.get(n)) is not None}
        missing = list(dict.fromkeys(n for n in negatives if n is not None and n not in known))
        hidden = self._encode(prompts + missing)
        for text, row in zip(missing, hidden[len(prompts):]):
            known[text] = row = row.clone()  # not a view: the cache must not pin the whole batch
            self._negatives.put(text, row)
        return [Guidance(cond=row, uncond=None if negative is None else known[negative],
                         scale=float(request.guidance_scale))
                for request, row, negative in zip(requests, hidden, negatives)]

    def _encode(self, texts: list[str]) -> torch.Tensor:
        tokens = self.pack.tokenizer(texts, padding="max_length", max_length=self.pack.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt")
        self.encoder_calls += 1
        return self.pack.text_encoder(tokens.input_ids.to(self.pack.device))[0].float()
