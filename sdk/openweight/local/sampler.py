"""Picking each next token from a step's logits as transformers' ``generate`` would."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Sampler"]


class Sampler:
    """Picks each next token the way ``generate`` would with the same settings."""

    def __init__(self, settings: dict[str, Any], processors: list[Any], seed: int | None,
                 prompt: Sequence[int], max_new: int) -> None:
        import torch
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.sample = bool(settings.get("do_sample"))
        steps: list[Any] = []
        penalty = settings.get("repetition_penalty")
        if penalty is not None and penalty != 1.0:
            steps.append(RepetitionPenaltyLogitsProcessor(penalty))
        steps.extend(processors)
        if self.sample:
            temperature = settings.get("temperature")
            if temperature is not None and temperature != 1.0:
                steps.append(TemperatureLogitsWarper(temperature))
            if settings.get("top_k"):
                steps.append(TopKLogitsWarper(int(settings["top_k"])))
            if settings.get("top_p") is not None and settings["top_p"] < 1.0:
                steps.append(TopPLogitsWarper(settings["top_p"]))
            if settings.get("min_p"):
                steps.append(MinPLogitsWarper(settings["min_p"]))
        self.steps = steps
        self.generator = None
        if self.sample:
            self.generator = torch.Generator()
            if seed is not None:
                self.generator.manual_seed(seed)
            else:
                self.generator.seed()
        self.ids = torch.zeros(len(prompt) + max_new, dtype=torch.long)
        self.ids[: len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        self.length = len(prompt)

    def pick(self, logits: Any) -> int:
        import torch

        if (self.steps or self.sample) and logits.device.type != "cpu":
            logits = logits.cpu()  # the token history and the generator are on the CPU
        if self.steps:
            logits = logits.float()
            seq = self.ids[: self.length].unsqueeze(0)
            for step in self.steps:
                logits = step(seq, logits)
        if self.sample:
            probs = torch.softmax(logits.float(), dim=-1)
            token = int(torch.multinomial(probs[0], 1, generator=self.generator))
        else:  # max is several times faster than argmax on a CPU
            token = int(logits[0].max(-1).indices)
        if self.length < self.ids.shape[0]:
            self.ids[self.length] = token
            self.length += 1
        return token
