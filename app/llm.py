"""`LLM`: the offline API, shaped like vLLM's.

    from strata import LLM, SamplingParams
    llm = LLM()                                   # the bundled SmolLM2-135M-Instruct
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError
from tqdm import tqdm

from strata.app.engines import start_engine
from strata.app.model_source import generation_defaults, load_tokenizer, preflight
from strata.app.output.processor import OutputProcessor, RequestProcessor
from strata.app.request_check import check_request, tokenize_prompt
from strata.app.vllm_flags import DTYPE_ALIASES, check_vllm_options, spell_keyword
from strata.config import EngineConfig, describe_validation_error
from strata.engine_protocol import Engine
from strata.model.grammar import GrammarCompiler
from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams
from strata.structured_outputs import StructuredOutputsParams

logger = logging.getLogger("strata")

PromptType = str | dict[str, Any] | list[int]
T = TypeVar("T")
# vLLM's LLM keywords that are not EngineConfig fields: accepted where their value is what Strata
# does anyway, refused otherwise (strata.app.vllm_flags.check_vllm_options).
VLLM_ONLY_KEYWORDS = ("trust_remote_code", "enable_prefix_caching", "enable_chunked_prefill", "quantization",
                      "kv_cache_dtype", "data_parallel_size")


class LLM:
    """Loads a model across `tensor_parallel_size x pipeline_parallel_size` ranks and generates.

    Every keyword is an EngineConfig field (see strata/config.py), or `generation_config` (as
    vLLM's: "auto" takes the model's generation_config.json as the defaults of `generate` and
    `chat` without SamplingParams, "vllm" SamplingParams' own, or a folder's file), or one of
    vLLM's VLLM_ONLY_KEYWORDS with the value Strata runs with; unknown or invalid ones raise
    ValueError naming the argument and what is allowed, before anything starts.

    The engine sees token ids only: this process tokenizes, validates each prompt, fans out n,
    and turns the engine's deltas into text and RequestOutputs (strata.app.output). The engine's
    async calls run on a private event loop thread, so `LLM` works under a running loop too.
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, distributed_executor_backend: str = "auto",
                 dtype: str = "auto", max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, block_size: int = 16,
                 seed: int = 0, load_format: str = "auto", generation_config: str = "auto", **kwargs: Any):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        check_vllm_options({key: kwargs.pop(key) for key in VLLM_ONLY_KEYWORDS if key in kwargs}, spell_keyword)
        try:
            self.config = EngineConfig(
                model=model, tokenizer=tokenizer, tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                distributed_executor_backend=distributed_executor_backend, dtype=DTYPE_ALIASES.get(dtype, dtype),
                max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                block_size=block_size, seed=seed, load_format=load_format, **kwargs,
            )
        except ValidationError as err:
            raise ValueError(describe_validation_error(err)) from None
        self.facts = preflight(self.config)
        logger.info("model: %s (%s, %d layers)", self.facts.model_dir, self.facts.architecture,
                    self.facts.num_layers)
        self.default_sampling_params: dict[str, float | int] = generation_defaults(self.facts.model_dir,
                                                                                   generation_config)
        self._tokenizer = load_tokenizer(self.facts)
        self._output = OutputProcessor(self._tokenizer)
        self._engine: Engine | None = start_engine(self.config, self.facts)
        self._info = self._engine.info
        self._grammars: GrammarCompiler | None = None  # structured outputs' compiler, made on first use
        self.max_model_len: int = self._info.max_model_len
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="strata-llm-loop", daemon=True)
        self._loop_thread.start()

    def _compile(self, constraint: StructuredOutputsParams) -> None:
        """Compiles a structured-output constraint at admission: a bad schema, regex or grammar
        raises ValueError here, before anything is queued (the sampling rank compiles its own)."""
        if self._tokenizer is None:
            raise ValueError("structured_outputs need a tokenizer; this LLM runs with skip_tokenizer_init=True")
        if self._grammars is None:
            self._grammars = GrammarCompiler.from_tokenizer(self._tokenizer, self._info.vocab_size,
                                                            list(self.facts.eos_token_ids))
        try:
            self._grammars.compile(constraint.to_spec())
        except ValueError as err:
            raise ValueError(f"structured_outputs.{constraint.field}: {err}") from None

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use without SamplingParams (vLLM's method of the same name):
        SamplingParams' defaults under the model's generation_config.json (see `generation_config`).
        A new object each time, so it may be changed: `p = llm.get_default_sampling_params();
        p.max_tokens = 256`."""
        return SamplingParams(**self.default_sampling_params)

    def _live_engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("this LLM has been shut down")
        return self._engine

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs `coro` on the private loop and waits; an interrupt here cancels it (and so aborts
        the requests it had queued)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    # ---- generation ----

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in input order. Prompts: strings, {"prompt": str} / {"prompt_token_ids": [...]},
        or token-id lists; one SamplingParams for all or one per prompt (None: the model's defaults,
        `get_default_sampling_params`). Every prompt is checked first: a bad one raises ValueError
        ("prompt {i}: ...") before any is queued."""
        items = _normalise_prompts(prompts)
        params = _per_prompt_params(
            self.get_default_sampling_params() if sampling_params is None else sampling_params, len(items))
        token_ids = [tokenize_prompt(self._tokenizer, text, ids) for text, ids in items]
        for i, (ids, p) in enumerate(zip(token_ids, params, strict=True)):
            try:
                check_request(ids, p, self._info, self._tokenizer is not None)
                if p.structured_outputs is not None:
                    self._compile(p.structured_outputs)
            except ValueError as err:
                raise ValueError(f"prompt {i}: {err}") from None
        engine = self._live_engine()
        processors = [self._output.start(f"offline-{uuid.uuid4().hex[:12]}", text, ids, p)
                      for (text, _), ids, p in zip(items, token_ids, params, strict=True)]
        if processors:
            with tqdm(total=len(processors), desc="Processed prompts", disable=not use_tqdm,
                      dynamic_ncols=True) as bar:
                self._run(self._generate(engine, processors, bar))
        return [rp.output() for rp in processors]

    @staticmethod
    async def _generate(engine: Engine, processors: list[RequestProcessor], bar: tqdm) -> None:
        """Every completion through one `generate_batch`; each delta to its request's processor."""
        owner: dict[str, RequestProcessor] = {}
        for rp in processors:
            for request in rp.engine_requests:
                owner[request.request_id] = rp
        unfinished = len(processors)
        stream = engine.generate_batch([r for rp in processors for r in rp.engine_requests])
        try:
            async for deltas in stream:
                for delta in deltas:
                    rp = owner.get(delta.request_id)
                    if rp is None or rp.finished:
                        continue
                    update = rp.process(delta)
                    if update is not None and update.stopped_by_string:
                        await engine.abort(delta.request_id)  # the engine cannot see stop strings
                    if rp.finished:
                        unfinished -= 1
                        bar.update(1)
                if unfinished == 0:
                    break  # the rest are stop-string aborts already sent
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()  # closing before the last step aborts what is left

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them."""
        if self._tokenizer is None:
            raise ValueError("chat needs a tokenizer for its chat template; this LLM runs with "
                             "skip_tokenizer_init=True (use generate with token ids)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._tokenizer.apply_chat_template(conv, tokenize=False, chat_template=chat_template,
                                                       add_generation_prompt=add_generation_prompt)
                   for conv in conversations]
        # The template already holds the special tokens (bos etc.), so do not add them again.
        token_ids = [{"prompt_token_ids": self._tokenizer.encode(p, add_special_tokens=False), "prompt": p}
                     for p in prompts]
        return self.generate(token_ids, sampling_params, use_tqdm)

    def get_tokenizer(self):
        return self._tokenizer

    # ---- introspection and lifecycle ----

    def stats(self) -> dict:
        return self._run(self._live_engine().stats())

    def rank_facts(self) -> list[dict]:
        return self._info.ranks

    def step_times(self) -> list[list[tuple[float, float]]]:
        return self._run(self._live_engine().step_times())

    def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        try:
            engine.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(timeout=10)
            if not self._loop_thread.is_alive():
                self._loop.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _normalise_prompts(prompts) -> list[tuple[str | None, list[int] | None]]:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    items = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            items.append((p, None))
        elif isinstance(p, dict) and ("prompt_token_ids" in p or "prompt" in p):
            ids = p.get("prompt_token_ids")
            items.append((p.get("prompt"), list(ids) if ids is not None else None))
        elif isinstance(p, list) and all(isinstance(t, int) for t in p):
            items.append((None, list(p)))
        else:
            raise ValueError(f"prompt {i} must be a string, a list of token ids, or a dict with "
                             f"'prompt' or 'prompt_token_ids'; got {type(p).__name__}")
    return items


def _per_prompt_params(sampling_params, n: int) -> list[SamplingParams]:
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt")
    return params
