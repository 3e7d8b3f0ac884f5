"""The driver: rank 0 (pipeline stage 0, tensor rank 0) plus the engine loop, the tokenizer and
the request streams.

Under Ray it is an async actor placed in bundle 0 of stage 0; under the mp backend a plain
object in the serving process. Either way the engine loop runs in its own thread (a step blocks
on the model), and callers talk to it through `generate` (an async stream of RequestOutput),
`generate_batch` (offline: results as each request finishes) and `abort`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

import torch
from strata.actors.engine.engine_core import EngineCore
from strata.actors.executor import DriverExecutor, rank_launcher
from strata.actors.nodes.node_address import bind_listener
from strata.actors.nodes.rendezvous import HeadRendezvous, hello_for
from strata.actors.startup_log import log_startup
from strata.actors.worker.rank import RankWorker
from strata.app.model_source import load_tokenizer

from strata.config import EngineConfig
from strata.model_facts import ModelFacts
from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata")

Sink = Callable[[RequestOutput | BaseException], None]


class Driver:
    def __init__(self, config_json: str, facts_json: str, placement=None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config = EngineConfig.model_validate_json(config_json)
        self.facts = facts = ModelFacts.from_json(facts_json)
        self.tokenizer = load_tokenizer(facts)
        self.worker = RankWorker(config_json, facts_json, rank=0, local_device_index=0)
        self.rendezvous: HeadRendezvous | None = None
        master_addr, listener = self._meet_nodes()
        master_port = listener.getsockname()[1]
        self.launcher = rank_launcher(config, config_json, facts_json, placement)
        try:
            handle = self.launcher.start(master_addr, master_port)
            self.rank_facts = self._bring_up_watching(handle, master_addr, master_port, listener)
            self.launcher.wait_started(handle)
        except BaseException:
            self.launcher.stop(timeout_s=0)
            if self.rendezvous is not None:
                self.rendezvous.close(say_bye=False)  # the other nodes see the head go and exit
            raise
        num_blocks = self.worker.num_blocks
        self.max_model_len = facts.max_model_len(config, num_blocks)
        log_startup(config, self.rank_facts, num_blocks, self.max_model_len)
        self.executor = DriverExecutor(self.worker)
        self.engine = EngineCore(config, self.executor, self.tokenizer, facts.vocab_size,
                                 self.max_model_len, num_blocks, list(facts.eos_token_ids),
                                 is_moe=self.rank_facts[0]["moe"])
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="strata-engine", daemon=True)
        self._thread.start()

    def _bring_up_watching(self, handle, master_addr: str, master_port: int, listener) -> list[dict]:
        """Rank 0's bring-up, watching the other ranks meanwhile: one that dies while starting (an
        import error on its node, a bad weight file, no memory) fails the start at once, with its
        error, rather than leaving rank 0 in the rendezvous until dist_init_timeout_s."""
        outcome: dict = {}

        def bring_up() -> None:
            try:
                outcome["facts"] = self.worker.bring_up(master_addr, master_port, listener)
            except BaseException as err:  # noqa: BLE001 - re-raised on the caller's thread
                outcome["error"] = err

        thread = threading.Thread(target=bring_up, name="strata-bring-up", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            failure = self.launcher.failure(handle)
            if failure is not None:
                raise RuntimeError(f"a rank failed to start, so the engine cannot: {failure}")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["facts"]

    def _meet_nodes(self):
        """Where torch.distributed's store listens (this node's private address, a socket bound
        now so no other process takes the port); with the mp backend across nodes, node 0's
        --master-addr, once every other node has joined (see actors/rendezvous.py)."""
        config = self.config
        if config.nnodes == 1:
            master_addr = self.worker.node_ip()
            return master_addr, bind_listener(master_addr)
        master_addr = config.master_addr
        self.rendezvous = HeadRendezvous(hello_for(config, "serve"), master_addr, config.master_port,
                                         config.dist_init_timeout_s)
        listener = bind_listener(master_addr)
        try:
            self.rendezvous.wait_for_nodes(listener.getsockname()[1])
        except BaseException:
            listener.close()
            raise
        return master_addr, listener

    # ---- the engine thread ----

    def _loop(self) -> None:
        if self.worker.device.type == "cuda":
            torch.cuda.set_device(self.worker.device)  # the current device is per thread
        while not self._stopping:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait(0.1)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # noqa: BLE001 - every request must hear of it
                logger.exception("engine step failed; failing the running requests")
                self._fail_all(err)
                continue
            for out in outputs:
                self._deliver(out.request_id, out, final=out.finished)

    def _drain_commands(self) -> None:
        while True:
            try:
                cmd, request_id, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "add":
                prompt, ids, params, sink = payload
                self._sinks[request_id] = sink
                try:
                    self.engine.add_request(request_id, prompt, ids, params)
                except Exception as err:  # noqa: BLE001 - reported to that request only
                    self._deliver(request_id, err, final=True)
            elif cmd == "abort":
                out = self.engine.abort(request_id)
                if out is not None:
                    self._deliver(request_id, out, final=True)

    def _deliver(self, request_id: str, item, final: bool) -> None:
        sink = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
        if sink is not None:
            sink(item)

    def _fail_all(self, err: BaseException) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._deliver(request_id, RuntimeError(f"engine step failed: {err}"), final=True)

    # ---- requests in (any thread) ----

    def tokenize_prompt(self, prompt: str | None, prompt_token_ids: list[int] | None) -> list[int]:
        if prompt_token_ids is not None:
            return list(prompt_token_ids)
        if not isinstance(prompt, str):
            raise ValueError(f"A prompt must be a string or token ids, got {type(prompt).__name__}.")
        if self.tokenizer is None:
            raise ValueError("Text prompts need a tokenizer; with skip_tokenizer_init=True pass token ids.")
        return self.tokenizer.encode(prompt)

    def submit(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
               params: SamplingParams, sink: Sink) -> None:
        """Validates (raising ValueError here, before the engine sees it) and queues a request."""
        ids = self.tokenize_prompt(prompt, prompt_token_ids)
        self.engine.validate(ids, params)
        self._commands.put(("add", request_id, (prompt, ids, params, sink)))
        self._wake.set()

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Streams the request's cumulative output after every step; aborts it if the consumer
        stops listening (a client that went away frees its KV blocks)."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self.submit(request_id, prompt, prompt_token_ids, params,
                    lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item))
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def generate_batch(self, requests: list[tuple[str, str | None, list[int] | None, SamplingParams]]):
        """Offline: queues every request, then yields (index, final output) as each finishes.
        All requests are validated first; a bad one raises before any is queued."""
        ids = [self.tokenize_prompt(p, t) for _, p, t, _ in requests]
        for i, ((_, _, _, params), tokens) in enumerate(zip(requests, ids, strict=True)):
            try:
                self.engine.validate(tokens, params)
            except ValueError as err:
                raise ValueError(f"prompt {i}: {err}") from None
        loop = asyncio.get_running_loop()
        done: asyncio.Queue = asyncio.Queue()

        def sink_for(index: int) -> Sink:
            def sink(item: RequestOutput | BaseException) -> None:
                if isinstance(item, BaseException) or item.finished:  # offline wants final outputs only
                    loop.call_soon_threadsafe(done.put_nowait, (index, item))
            return sink

        for i, ((request_id, prompt, _, params), tokens) in enumerate(zip(requests, ids, strict=True)):
            self._commands.put(("add", request_id, (prompt, tokens, params, sink_for(i))))
        self._wake.set()
        pending = {i: request_id for i, (request_id, *_) in enumerate(requests)}
        try:
            while pending:
                i, item = await done.get()
                pending.pop(i, None)
                if isinstance(item, BaseException):
                    raise item
                yield i, item
        finally:
            for request_id in pending.values():  # the caller failed or went away: free their blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))
        self._wake.set()

    # ---- what the outside sees ----

    def ready(self) -> dict:
        return {"max_model_len": self.max_model_len, "num_blocks": self.worker.num_blocks,
                "ranks": self.rank_facts}

    def stats(self) -> dict:
        return self.engine.stats()

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None) -> str:
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def step_times(self) -> list[list[tuple[float, float]]]:
        return [self.worker.step_times(), *self.launcher.step_times()]

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        try:
            self.executor.shutdown()
        except Exception:  # noqa: BLE001 - a rank already gone must not stop the rest of the shutdown
            logger.warning("could not send the shutdown plan to every rank", exc_info=True)
        self.launcher.stop()
        self.worker.shutdown()
        if self.rendezvous is not None:
            self.rendezvous.close()  # headless nodes hear Bye and exit
