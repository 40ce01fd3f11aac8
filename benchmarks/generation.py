"""Issue 20's scenarios on the GPT-2-shaped model: generation, and many invokes.

Generation: 16 new tokens, greedy, ``min_new_tokens`` = ``max_new_tokens`` so
that every tool makes the same 16 forward calls (KV cache on, prompt 1 × 32):
(a) the 12 block outputs saved at every step, (b) a fixed vector added to
block 5's output at every step. The floor is forward hooks appending each
block output (or adding the vector) at every call, around ``generate``.

Invokes: 1, 8 and 64 invokes in one trace, each one row of ids 1 × 32,
saving block 5's output; the floor is one hook on the batched forward of the
same rows. Times are reported per invoke.

The language models need a tokenizer only for its pad and end tokens: a
word-level one over the model's 1000 ids, built here (no download).
"""

from __future__ import annotations

from typing import Any

import torch

import nnsight_pure
from benchmarks.device import on
from benchmarks.scenarios import Case, Group, _block_output, _same, gpt2, nnsight_available

STEPS = 16
GENERATE = {"max_new_tokens": STEPS, "min_new_tokens": STEPS, "do_sample": False, "use_cache": True, "pad_token_id": 0}
INVOKE_COUNTS = (1, 8, 64)


def tokenizer() -> Any:
    """A word-level tokenizer "w0" … "w999" (pad w0, end w1, unknown w2)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(1000)}, unk_token="w2"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]  # unannotated in transformers
        tokenizer_object=words, pad_token="w0", eos_token="w1", unk_token="w2",
        model_input_names=["input_ids", "attention_mask"],
    )


def _prompt() -> torch.Tensor:
    return on(torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(1)))


def _plain_generate(net: Any, ids: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = net.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE)
    return out


def _steering() -> torch.Tensor:
    return on(torch.randn(256, generator=torch.Generator().manual_seed(2)))


def generation_groups() -> list[Group]:
    """10a: save every block output at every step; 10b: steer block 5 at every step."""
    net = gpt2()
    ids, vector = _prompt(), _steering()
    model = nnsight_pure.LanguageModel(net, tokenizer=tokenizer())
    blocks = list(net.transformer.h)

    def hooks_saves() -> Any:
        seen: list[Any] = []

        def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
            seen.append(_block_output(output))

        handles = [block.register_forward_hook(keep) for block in blocks]
        try:
            _plain_generate(net, ids)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def trace_saves() -> Any:
        with model.generate(ids, **GENERATE) as tracer:
            seen = nnsight_pure.list().save()
            with tracer.all():
                for i in range(12):
                    seen.append(model.transformer.h[i].output)
        return [_block_output(value) for value in seen.value]

    def steer(module: torch.nn.Module, args: Any, output: Any) -> None:
        hidden = _block_output(output)
        hidden[:] += vector  # the same work as the traces' `output[:] += vector` (an add and a copy)

    def hooks_steer() -> Any:
        handle = blocks[5].register_forward_hook(steer)
        try:
            return _plain_generate(net, ids)
        finally:
            handle.remove()

    def trace_steer() -> Any:
        with model.generate(ids, **GENERATE):
            with model.transformer.h[5].all():
                _block_output_proxy(model.transformer.h[5].output)[:] += vector
            out = model.generator.output.save()
        return out.value

    saves: dict[str, Case] = {"hand-written hooks": hooks_saves, "nnsight_pure trace": trace_saves}
    steers: dict[str, Case] = {"hand-written hooks": hooks_steer, "nnsight_pure trace": trace_steer}
    if nnsight_available():
        _their_generation(saves, steers, ids, vector)
    return [
        Group("generation_saves", f"10a. GPT-2 12×256 generates {STEPS} tokens, saving the 12 block outputs "
              "at every step", saves, "hand-written hooks", _same, events=12 * STEPS, rounds=8, samples=2),
        Group("generation_steer", f"10b. GPT-2 12×256 generates {STEPS} tokens, adding a vector to block 5's "
              "output at every step", steers, "hand-written hooks", _same, events=STEPS, rounds=8, samples=2),
    ]


def _block_output_proxy(output: Any) -> Any:
    """A block output's hidden state in a trace: the output itself (transformers
    5) or its first item (4.x, where GPT-2's block returns a tuple)."""
    import transformers

    return output[0] if int(transformers.__version__.split(".")[0]) < 5 else output


def _their_generation(saves: dict[str, Case], steers: dict[str, Case], ids: torch.Tensor, vector: torch.Tensor) -> None:
    """nnsight 0.8's LanguageModel from the same in-memory model and tokenizer;
    ``for step in tracer.iter[0:16]`` (a bounded loop: code after an
    unbounded one does not run there, and the result is read after it)."""
    import nnsight

    theirs = nnsight.LanguageModel(gpt2(), tokenizer=tokenizer())

    def their_saves() -> Any:
        with theirs.generate(ids, **GENERATE) as tracer:
            seen = nnsight.save(list())
            for _ in tracer.iter[0:STEPS]:
                for i in range(12):
                    seen.append(theirs.transformer.h[i].output)
        return [_block_output(value) for value in seen]

    def their_steer() -> Any:
        with theirs.generate(ids, **GENERATE) as tracer:
            for _ in tracer.iter[0:STEPS]:
                _block_output_proxy(theirs.transformer.h[5].output)[:] += vector
            out = tracer.result.save()
        return out

    saves["nnsight trace"] = their_saves
    steers["nnsight trace"] = their_steer


def _rows(count: int) -> torch.Tensor:
    return on(torch.randint(0, 1000, (count, 32), generator=torch.Generator().manual_seed(4)))


def invokes_groups() -> list[Group]:
    """11: n invokes of one row each (n = 1, 8, 64) against one hook on the batched forward."""
    net = gpt2()
    model = nnsight_pure.NNsight(net)
    theirs = None
    if nnsight_available():  # nnsight's NNsight batches no invokes: its LanguageModel does
        import nnsight

        theirs = nnsight.LanguageModel(gpt2(), tokenizer=tokenizer())
    groups = []
    for count in INVOKE_COUNTS:
        rows = _rows(count)
        cases = invoke_cases(net, model, theirs, rows)
        rounds, samples = {1: (None, None), 8: (10, 3)}.get(count, (5, 1))  # a 64-row forward is slow
        groups.append(Group(f"invokes_{count}", f"11. {count} invoke(s) of ids 1×32 in one trace, saving block 5's "
                            "output (times per invoke)", cases, "hand-written hooks", _same, per=count,
                            rounds=rounds, samples=samples))
    return groups


def invoke_cases(net: Any, model: Any, theirs: Any, rows: torch.Tensor) -> dict[str, Case]:
    """The cases of one invokes group (also run by memory.py, one per process)."""

    def hooks() -> Any:
        seen: list[Any] = []

        def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
            seen.append(_block_output(output))

        handle = net.transformer.h[5].register_forward_hook(keep)
        try:
            net(rows)
        finally:
            handle.remove()
        return seen[0]

    def trace() -> Any:
        saved = []
        with model.trace() as tracer:
            for row in rows:
                with tracer.invoke(row[None]):
                    saved.append(model.transformer.h[5].output.save())
        return torch.cat([_block_output(proxy.value) for proxy in saved])

    cases: dict[str, Case] = {"hand-written hooks": hooks, "nnsight_pure trace": trace}
    if theirs is not None:

        def their_trace() -> Any:
            saved = []
            with theirs.trace() as tracer:
                for row in rows:
                    with tracer.invoke(row[None]):
                        saved.append(theirs.transformer.h[5].output.save())
            return torch.cat([_block_output(getattr(value, "value", value)) for value in saved])

        cases["nnsight trace"] = their_trace
    return cases
