"""The lmms-eval chat model ``visor`` (imported by lmms-eval only; see visor.lmms)."""

from __future__ import annotations

import functools

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from .lmms import Request, Runner


class Visor(lmms):
    is_simple = False

    def __init__(self, pretrained: str, batch_size: int | str = 1, device: str | None = None, **model_args):
        super().__init__()
        model_args.pop("max_batch_size", None)
        self.runner = Runner(pretrained, batch_size=batch_size, device=device, **model_args)
        self.batch_size_per_gpu = self.runner.batch_size

    def generate_until(self, requests) -> list[GenerationResult]:
        asked = []
        for instance in requests:
            _context, doc_to_messages, gen_kwargs, doc_id, task, split = instance.args
            # the document (and its decoded images) is read when its batch runs, not all at once
            messages = functools.partial(self._messages, doc_to_messages, task, split, doc_id)
            asked.append(Request(messages, dict(gen_kwargs), task, doc_id))
        answers = self.runner.generate(asked)
        return [
            GenerationResult(a.text, TokenCounts(input_tokens=a.n_input, output_tokens=a.n_output)) for a in answers
        ]

    def _messages(self, doc_to_messages, task, split, doc_id):
        return doc_to_messages(self.task_dict[task][split][doc_id])

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "visor answers generation tasks (output_type: generate_until); this task scores log-likelihoods"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("visor answers single-round generation tasks")
