"""LanguageModel: Hugging Face causal language models, with tokenizing, padding and generation.

``LanguageModel("gpt2")`` (a hub id or a local folder) loads the config and
tokenizer at once and the weights lazily: the module tree is built on the
meta device, so it can be printed and traced (and scanned) before any weight
is read; the real weights load at the first real run (or at once with
``dispatch=True``), through ``from_pretrained``.

Inputs may be strings, token ids (lists or tensors), or a tokenizer's
``BatchEncoding``/dict. Several invokes are left-padded together, each
keeping its own attention mask, and the position ids are derived from the
attention mask, so a padded row computes exactly what the prompt computes
alone (nnsight #672 and TransformerLens #1609 silently did not).

A model or tokenizer the user passes in is never changed: the
``generator`` hook point (``model.generator.output``: the generated ids)
hangs under a root of the wrapper's own (`_own_root`, sharing the user's
submodules and weights), and a tokenizer without a pad token is padded with
its end token through a private copy (`_padding`).

transformers is imported only when a LanguageModel is made (it is an
optional extra: ``pip install nnsight_pure[lm]``).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, ClassVar, Mapping

import torch

from ..scan import scanning
from .nnsight import NNsight
from .wrapper_module import WrapperModule


def _dtype_keyword(transformers: Any) -> str:
    """The name under which this transformers takes a model's dtype:
    ``dtype`` from 4.56 on, ``torch_dtype`` before (4.53's models reject
    ``dtype``)."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _only_dtype(load_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in load_kwargs.items() if k in ("dtype", "torch_dtype")}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - transformers is a dev dependency
        raise ImportError(
            "LanguageModel needs the transformers package: pip install nnsight_pure[lm]"
        ) from error
    return transformers


class LanguageModel(NNsight):
    """A traceable Hugging Face causal language model.

    Args:
        model: a hub repo id or a local folder (loaded with ``from_pretrained``),
            or an already built ``PreTrainedModel`` (then ``tokenizer`` is needed
            unless it can be loaded from the model's ``name_or_path``).
        tokenizer: a tokenizer to use instead of loading one.
        automodel: the ``transformers`` auto class (or its name) that builds the model.
        dispatch: load the real weights now instead of at the first run.
        device_map: passed to ``from_pretrained`` (``"auto"``, ``"cpu"``, a dict; needs
            ``accelerate``).
        torch_dtype: the weights' dtype (or ``dtype=``), passed to ``from_pretrained``
            under the name the installed transformers takes.
        rename: envoy aliases, as for `NNsight`.
        **kwargs: passed to ``from_pretrained`` (and ``AutoConfig``), e.g. ``revision``.

    ``model.generate(...)`` opens a trace of the model's ``generate``;
    ``model.generator.output`` is then the generated ids.
    """

    __methods__: ClassVar[dict[str, str]] = {"generate": "_generate"}

    tokenizer: Any
    config: Any
    repo_id: str | None

    def __init__(
        self,
        model: str | torch.nn.Module,
        *,
        tokenizer: Any = None,
        automodel: Any = "AutoModelForCausalLM",
        dispatch: bool = False,
        device_map: Any = None,
        torch_dtype: Any = None,
        rename: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        transformers = _transformers()
        if isinstance(automodel, str):
            automodel = getattr(transformers, automodel)
        load_kwargs = dict(kwargs)
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        dtype = load_kwargs.pop("dtype", load_kwargs.pop("torch_dtype", torch_dtype))
        if dtype is not None:
            load_kwargs[_dtype_keyword(transformers)] = dtype
        given_tokenizer = tokenizer is not None
        if isinstance(model, torch.nn.Module):
            config = getattr(model, "config", None)
            module, repo_id, dispatched = _own_root(model), getattr(config, "_name_or_path", None), True
            if tokenizer is None:
                if not repo_id:
                    raise ValueError("a LanguageModel made from a module needs tokenizer=...")
                tokenizer = transformers.AutoTokenizer.from_pretrained(repo_id, padding_side="left")
        else:
            repo_id = str(model)
            config = transformers.AutoConfig.from_pretrained(
                repo_id, **{k: v for k, v in kwargs.items() if k not in ("dtype", "torch_dtype")}
            )
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(repo_id, padding_side="left")
            if dispatch:
                module = automodel.from_pretrained(repo_id, config=config, **load_kwargs)
            else:
                with torch.device("meta"):  # the tree as it will load: same dtype, no memory
                    module = automodel.from_config(config, **_only_dtype(load_kwargs))
            dispatched = dispatch
        tokenizer = _padding(tokenizer, given_tokenizer)
        if "generator" not in module._modules:
            module.generator = WrapperModule()  # the generated ids pass through it (our own root)
        super().__init__(module, rename)
        for name, value in (
            ("tokenizer", tokenizer),
            ("config", config),
            ("repo_id", repo_id),
            ("_automodel", automodel),
            ("_load_kwargs", load_kwargs),
            ("_dispatched", dispatched),
        ):
            object.__setattr__(self, name, value)

    # --- weights ----------------------------------------------------------------------

    @property
    def dispatched(self) -> bool:
        """Whether the real weights are loaded (else the model is on the meta device)."""
        return bool(self._dispatched)

    def dispatch(self) -> None:
        """Load the real weights now (``from_pretrained``); modules attached to the
        meta-device model are carried over."""
        if self._dispatched:
            return
        skeleton = self._model
        real = self._automodel.from_pretrained(self.repo_id, config=self.config, **self._load_kwargs)
        for path, module in skeleton.named_modules():
            parent_path, _, name = path.rpartition(".")
            try:
                real.get_submodule(path)
            except AttributeError:
                real.get_submodule(parent_path).add_module(name, module)  # an attachment
        self._handle.replace(real)
        object.__setattr__(self, "_dispatched", True)

    def _before_run(self) -> None:
        self.dispatch()

    # --- inputs -----------------------------------------------------------------------

    def _tokenize(self, value: Any, what: str, **tokenizer_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` for text, token ids or an encoding."""
        tokenizer = self.tokenizer
        texts_given = isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value)
        if isinstance(value, str) or texts_given:
            texts = [value] if isinstance(value, str) else list(value)
            encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", **tokenizer_kwargs)
            return encoded["input_ids"], encoded["attention_mask"]
        if isinstance(value, Mapping) or hasattr(value, "input_ids") and hasattr(value, "keys"):
            ids = torch.as_tensor(value["input_ids"])
            ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
            mask = value.get("attention_mask") if hasattr(value, "get") else None
            mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
            return ids, mask
        if isinstance(value, torch.Tensor):
            ids = value.unsqueeze(0) if value.ndim == 1 else value
            return ids, torch.ones_like(ids)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            ids = torch.tensor([list(value)])
            return ids, torch.ones_like(ids)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
            padded = tokenizer.pad({"input_ids": [list(v) for v in value]}, return_tensors="pt", padding_side="left")
            return padded["input_ids"], padded["attention_mask"]
        raise TypeError(
            f"{what} must be a string, a list of strings, token ids (a list or a tensor) or a "
            f"tokenizer encoding; got {type(value).__name__}"
        )

    def _prepare_input(self, *inputs: Any, **kwargs: Any) -> tuple[tuple[tuple[Any, ...], dict[str, Any]], int]:
        """One invoke's inputs as ``input_ids``/``attention_mask`` (and ``labels``)."""
        input_ids = kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        labels = kwargs.pop("labels", None)
        if len(inputs) > 1 or (inputs and input_ids is not None):
            raise TypeError("an invoke takes one input: a prompt, a list of prompts, ids, or input_ids=...")
        if inputs:
            ids, mask = self._tokenize(inputs[0], "the input", **kwargs)
        elif input_ids is not None:
            encoding = {"input_ids": input_ids}
            if attention_mask is not None:
                encoding["attention_mask"] = attention_mask
            ids, mask = self._tokenize(encoding, "input_ids")
        else:
            raise TypeError("an invoke needs an input: a prompt, a list of prompts, ids, or input_ids=...")
        prepared: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if labels is not None:
            label_ids, label_mask = self._tokenize(labels, "labels")
            prepared["labels"] = label_ids.masked_fill(label_mask == 0, -100)
        return ((), prepared), int(ids.shape[0])

    def _example_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """A short prompt, to list a module's operations outside a trace (``print(envoy.source)``)."""
        return ("Hello world",), {}

    def _invoker_inputs(self, prepared: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
        """``invoker.inputs`` in nnsight 0.4's shape for language models:
        ``((encoding,), {})``, so ``invoker.inputs[0][0]["input_ids"]`` are the ids."""
        _, encoding = prepared
        return ((_transformers().BatchEncoding(dict(encoding)),), {})

    def _batch(
        self,
        batched_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Left-pad the invokes to one length and stack them, each keeping its own mask."""
        if batched_inputs is None:
            return args, kwargs
        _, batch = batched_inputs
        width = max(batch["input_ids"].shape[1], kwargs["input_ids"].shape[1])
        fill = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
        joined = {}
        for name, value in kwargs.items():
            if name in fill:
                pad = fill[name]
                joined[name] = torch.cat([_left_pad(batch[name], width, pad), _left_pad(value, width, pad)])
            else:
                joined[name] = value
        return (), joined

    # --- running ----------------------------------------------------------------------

    def _with_positions(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Position ids from the attention mask, so left padding shifts nothing."""
        mask = inputs.get("attention_mask")
        if mask is None or "position_ids" in inputs:
            return inputs
        if "position_ids" not in inspect.signature(self._model.forward).parameters:
            return inputs
        positions = mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1)
        return {**inputs, "position_ids": positions}

    def _on_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        device = self.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for k, v in inputs.items()}

    def _execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **self._on_device(self._with_positions(kwargs)))

    def _generate(self, *args: Any, max_new_tokens: int = 1, **kwargs: Any) -> Any:
        """Generate (``max_new_tokens`` defaults to 1, as in nnsight); the ids go
        through ``model.generator`` so that ``.generator.output`` can be traced."""
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        if scanning():
            kwargs = self._scanned_generation(kwargs)
        model: Any = self._model  # a PreTrainedModel: generate and the generator child
        output = model.generate(*args, max_new_tokens=max_new_tokens, **self._on_device(kwargs))
        return model.generator(output)

    def _scanned_generation(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``generate``'s arguments for a scan on fake tensors: the shapes of
        a generation that runs all ``max_new_tokens`` steps.

        ``generate`` asks in Python whether every row has produced an end
        token, which depends on the weights, so a fake run cannot answer.
        In a scan the scores are replaced by a constant that picks a token
        that ends nothing, and decoding is greedy (sampling draws at random
        from them); every step then has the shapes of a real step, and the
        question has a real answer (see ``scan._InputValuesMode``)."""
        transformers = _transformers()
        config = getattr(self._model, "generation_config", None)
        ending: set[int] = set()
        for ids in (kwargs.get("eos_token_id"), getattr(config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(ids, int):
                ending.add(ids)
            elif isinstance(ids, (list, tuple)):
                ending.update(int(i) for i in ids)
        token = min(set(range(len(ending) + 1)) - ending)

        base: Any = transformers.LogitsProcessor  # transformers is imported lazily, as Any

        class PickOneToken(base):  # type: ignore[misc]  # a subclass of Any
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                picked = torch.arange(scores.shape[-1], device=scores.device) == token
                return picked.to(scores.dtype).expand(scores.shape)

        processors = transformers.LogitsProcessorList(kwargs.get("logits_processor") or [])
        processors.append(PickOneToken())
        return {**kwargs, "logits_processor": processors, "do_sample": False}


def _own_root(module: torch.nn.Module) -> torch.nn.Module:
    """A root module of the wrapper's own for a module the user passed in: a
    shallow copy with its own list of children (where ``generator`` goes),
    sharing everything else (the submodules, weights, config, hooks)."""
    if "generator" in module._modules:
        return module  # a tree that has its hook point already (e.g. another wrapper's root)
    root = copy.copy(module)
    root.__dict__["_modules"] = type(module._modules)(module._modules)
    return root


def _padding(tokenizer: Any, given: bool) -> Any:
    """A tokenizer that pads (with its end token when it has no pad token);
    one the user gave is copied first, not changed."""
    if tokenizer.pad_token is not None:
        return tokenizer
    padded = copy.deepcopy(tokenizer) if given else tokenizer
    padded.pad_token = padded.eos_token
    return padded


def _left_pad(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    pad = torch.full((tensor.shape[0], missing), value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)
