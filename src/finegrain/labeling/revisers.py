"""The revisers of ``finegrain label revise``: the reviser prompt, the LLM backends and the registry of backends.

A reviser is any object with ``run(jobs)`` (:class:`Reviser`): for each :class:`RevisionJob` it yields
``(job, revised, None)`` or ``(job, None, reason)``, in any order, as each row finishes; a revised text equal
to the rejected response means "nothing to change". ``--reviser NAME`` calls the factory ``factory(cfg)``
registered as NAME by :func:`register_reviser` with the command's :class:`~finegrain.labeling.revise.ReviseConfig`.
:mod:`finegrain.labeling.revise` registers ``hf`` (:class:`HFReviser`) and ``openai`` (:class:`OpenAIReviser`,
through the ``openai`` SDK); the ``finegrain`` command adds the built-in world's rule reviser, ``world``. The
backends, the prompt with its :data:`MARKER` line (TLCR's convention) and the retries of failed rows:
docs/labeling.md, "finegrain label revise".
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import itertools
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from finegrain.errors import ConfigError, FinegrainError

__all__ = ["DEFAULT_BASE_URL", "MARKER", "REVISER_PROMPT", "REVISER_PROMPT_NO_CHOSEN", "REVISER_SYSTEM",
           "ChatCompletionsClient", "EndpointError", "HFReviser", "OpenAIReviser", "Reviser", "RevisionJob",
           "build_messages", "conversation_text", "describe_revisers", "parse_revision",
           "read_prompt_template", "register_reviser", "registered_revisers", "reviser_factory"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"

MARKER = "<|Start Of Modified Response|>"
"""The line after which a reviser's reply holds only the revised response (TLCR's convention)."""

REVISER_SYSTEM = "You are a meticulous editor of AI assistant responses. You fix a response with the smallest edits."

REVISER_PROMPT = f"""Below are a prompt and two responses to it. Response A was judged better than Response B.

[Prompt]
{{prompt}}

[Response A]
{{chosen}}

[Response B]
{{rejected}}

First, compare the two responses and explain briefly why Response A is better than Response B.
Then rewrite Response B with the fewest possible edits so that it becomes better than Response A: change only the \
parts that make it worse (mistakes, unhelpful, unsafe or off-topic content) and keep everything else exactly as it \
is, including its wording, order and format. Do not copy Response A.
Finally, print the line
{MARKER}
and after it only the rewritten Response B, with nothing else."""
"""The reviser's instruction for a pair; ``{prompt}``, ``{chosen}``, ``{rejected}`` are filled in."""

REVISER_PROMPT_NO_CHOSEN = f"""Below are a prompt and a response to it that can be improved.

[Prompt]
{{prompt}}

[Response]
{{rejected}}

First, explain briefly what makes the response worse than it could be.
Then rewrite the response with the fewest possible edits that fix those problems: change only the parts that make \
it worse (mistakes, unhelpful, unsafe or off-topic content) and keep everything else exactly as it is, including \
its wording, order and format.
Finally, print the line
{MARKER}
and after it only the rewritten response, with nothing else."""
"""The reviser's instruction for a row without a chosen response."""

_PLACEHOLDER = re.compile(r"\{(prompt|rejected|chosen)\}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

Result = tuple["RevisionJob", "str | None", "str | None"]
"""What a reviser yields per row: ``(job, revised, None)`` or ``(job, None, failure_reason)``."""


class EndpointError(FinegrainError):
    """The chat-completions endpoint cannot serve this job (bad URL, model, key, or unreachable): stop."""


# ------------------------------------------------------------------------------------------------ prompt, reply


def conversation_text(prompt: str | Sequence[dict]) -> str:
    """A prompt as plain text: a string unchanged; one user message as its content; otherwise one
    ``Role: content`` paragraph per message.

    Example:
        >>> conversation_text([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        ...                    {"role": "user", "content": "and?"}])
        'User: hi\\n\\nAssistant: hello\\n\\nUser: and?'
    """
    if isinstance(prompt, str):
        return prompt
    msgs = list(prompt)
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in msgs)


def build_messages(prompt: str | Sequence[dict], rejected: str, chosen: str | None = None,
                   template: str | None = None) -> list[dict[str, str]]:
    """The chat messages that ask a reviser for a minimal edit of ``rejected``.

    Args:
        prompt: the pair's prompt (text or messages; messages are reduced by :func:`conversation_text`).
        rejected: the response to revise.
        chosen: the preferred response, or None (then :data:`REVISER_PROMPT_NO_CHOSEN` is used).
        template: an instruction with ``{prompt}``, ``{rejected}`` (and ``{chosen}``) placeholders; default the
            built-in one. Placeholders are filled in one pass, so braces in the texts are kept as they are.

    Returns:
        ``[{"role": "system", ...}, {"role": "user", ...}]``.
    """
    if template is None:
        template = REVISER_PROMPT if chosen is not None else REVISER_PROMPT_NO_CHOSEN
    values = {"prompt": conversation_text(prompt).strip(), "rejected": rejected.strip(), "chosen": (chosen or "").strip()}
    user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    return [{"role": "system", "content": REVISER_SYSTEM}, {"role": "user", "content": user}]


def parse_revision(reply: str) -> str | None:
    """The revised response in a reviser's reply: the text after the last :data:`MARKER`, stripped.

    Returns None when the reply has no marker or nothing after it.

    Example:
        >>> parse_revision("B is vague.\\n<|Start Of Modified Response|>\\nIt is cold.\\n")
        'It is cold.'
    """
    k = reply.rfind(MARKER)
    if k < 0:
        return None
    text = reply[k + len(MARKER):].strip()
    return text or None


def _judge(reply: str, cut_off: bool) -> tuple[str | None, str | None]:
    """``(revised, None)``, or ``(None, reason)`` for a reply cut off at the token limit or without the marker."""
    revised = None if cut_off else parse_revision(reply)
    if revised is None:
        return None, "reply cut off at max_tokens" if cut_off else "reply without the marker"
    return revised, None


def read_prompt_template(path: str | Path) -> str:
    """The text of a ``--prompt_template`` file, which must hold ``{rejected}`` and ask for the :data:`MARKER` line.

    Raises:
        ConfigError: no such file, or a template without ``{rejected}`` or the marker.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt_template: file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if "{rejected}" not in text:
        raise ConfigError(f"prompt_template {p} must contain {{rejected}}, where the response to revise goes")
    if MARKER not in text:
        raise ConfigError(f"prompt_template {p} must ask for the marker line {MARKER} (the revision is read after it)")
    return text


@dataclasses.dataclass
class RevisionJob:
    """One row to revise.

    Attributes:
        index: 0-based position of the row in the input split (the key that makes output resumable).
        prompt: the prompt as given (text, or a list of messages).
        rejected: the response to revise (text).
        chosen: the preferred response, or None.
        ids: id columns of the input row (``id``, ``idx``, ``uid``, ``*_id``), copied to the output.
        template: the reviser's instruction (None: the built-in one).
    """

    index: int
    prompt: str | list[dict]
    rejected: str
    chosen: str | None = None
    ids: dict[str, Any] = dataclasses.field(default_factory=dict)
    template: str | None = None

    @property
    def messages(self) -> list[dict[str, str]]:
        """The chat messages that ask an LLM reviser for the revision (built when asked, not kept)."""
        return build_messages(self.prompt, self.rejected, self.chosen, self.template)


# ------------------------------------------------------------------------------------------------------ registry


class Reviser(Protocol):
    """What ``finegrain label revise`` runs: ``run(jobs)`` yields one :data:`Result` per job, as each finishes."""

    def run(self, jobs: Iterable[RevisionJob]) -> Iterator[Result]: ...


ReviserFactory = Callable[[Any], Reviser]
"""``factory(cfg) -> reviser``, ``cfg`` the command's :class:`~finegrain.labeling.revise.ReviseConfig`."""


_REGISTRY: dict[str, tuple[ReviserFactory, str]] = {}
"""Name -> (factory, one-line summary)."""


def register_reviser(name: str, factory: ReviserFactory, summary: str = "") -> None:
    """Make ``--reviser NAME`` call ``factory(cfg)`` for its reviser; a name registered twice is replaced (an
    application registering again with other settings). ``summary`` is one line for help texts and errors."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a reviser name is a plain word (letters, digits, '_', '-', '.'), got {name!r}")
    _REGISTRY[name] = (factory, summary)


def registered_revisers() -> list[str]:
    """The registered reviser names."""
    return sorted(_REGISTRY)


def describe_revisers() -> str:
    """One entry per registered reviser, for help texts and error messages."""
    return "; ".join(f"{name}{': ' + summary if summary else ''}"
                     for name, (_, summary) in sorted(_REGISTRY.items()))


def reviser_factory(name: str) -> ReviserFactory:
    """The factory registered as ``name``.

    Raises:
        ConfigError: no reviser of that name; the message lists the registered ones.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"--reviser {name!r} is not a registered reviser; registered: {describe_revisers()} "
                          "(applications register more: the finegrain command adds the built-in world's rule "
                          "reviser 'world')")
    return _REGISTRY[name][0]


# ------------------------------------------------------------------------------------ local Hugging Face model


class HFReviser:
    """A local Hugging Face chat model, prompted through its chat template, generating in batches.

    Args:
        model: a causal LM (already on its device).
        tokenizer: its tokenizer, with a chat template.
        batch_size: prompts generated together (left-padded).
        max_new_tokens: most generated tokens per reply; a reply that reaches it without EOS has failed.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_p: nucleus sampling with ``temperature > 0``.
        max_retries: times a failed row is generated again; only when sampling (greedy would repeat the reply).
        seed: seed of the sampler.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, max_new_tokens: int = 1024,
                 temperature: float = 0.0, top_p: float = 1.0, max_retries: int = 3, seed: int = 0):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'the model')!r} has no chat "
                              "template; use a chat/instruct model (or save a chat_template with the tokenizer)")
        if tokenizer.pad_token_id is None:  # batched generation pads; the EOS token is the usual stand-in
            if tokenizer.eos_token_id is None:
                raise ConfigError("the reviser's tokenizer has neither a pad nor an EOS token; set one and save it")
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.max_retries = max_retries if temperature > 0 else 0

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of ``messages`` under the chat template, ready for the assistant's reply."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[tuple[str, bool]]:
        """``(reply, cut_off)`` per conversation: the decoded new tokens, and whether ``max_new_tokens`` ended it."""
        import torch

        from finegrain.data.collate import collate_completions
        from finegrain.rl.rollout import resolve_special_ids

        tok = self.tokenizer
        prompts = [{"prompt_input_ids": tok(self.render(m), add_special_tokens=False)["input_ids"],
                    "completion_input_ids": []} for m in conversations]
        batch = collate_completions(prompts, tok.pad_token_id).to(next(self.model.parameters()).device)
        enc = {"input_ids": batch.prompt_input_ids, "attention_mask": batch.prompt_attention_mask}  # left-padded
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": tok.pad_token_id,
                                  "do_sample": self.temperature > 0}
        if self.model.generation_config.eos_token_id is None and tok.eos_token_id is not None:
            kwargs["eos_token_id"] = tok.eos_token_id
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        eos = set(resolve_special_ids(self.model, tok)[0])  # the generation config's and tokenizer's EOS
        replies = []
        for ids in new:
            ended = next((j for j, t in enumerate(ids) if t in eos), None)
            kept = ids if ended is None else ids[:ended]
            replies.append((tok.decode(kept, skip_special_tokens=True), ended is None and len(ids) >= self.max_new_tokens))
        return replies

    def run(self, jobs: Iterable[RevisionJob]) -> Iterator[Result]:
        import torch

        torch.manual_seed(self.seed)
        queue = collections.deque(jobs)
        tries: collections.Counter = collections.Counter()
        self.model.eval()
        while queue:
            batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            for job, (reply, cut_off) in zip(batch, self.generate([j.messages for j in batch])):
                revised, reason = _judge(reply, cut_off)
                if revised is None and tries[job.index] < self.max_retries:
                    tries[job.index] += 1
                    queue.append(job)
                else:
                    yield job, revised, reason


# --------------------------------------------------------------------------------- OpenAI-compatible endpoint


def _unreachable(error: BaseException) -> str | None:
    """Why the server could not be reached (the innermost cause), or None when the connection was made and then
    lost. Transport-neutral: the SDK's transports all raise a ``ConnectError`` before a connection exists."""
    chain, seen = [], error
    while seen is not None and len(chain) < 16:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if not any(type(e).__name__ == "ConnectError" or isinstance(e, ConnectionRefusedError) for e in chain):
        return None
    return str(chain[-1]) or type(chain[-1]).__name__


class ChatCompletionsClient:
    """A client of one OpenAI-compatible chat-completions endpoint, through the ``openai`` SDK.

    Retries 408, 409, 425, 429, 5xx, timeouts and dropped connections with exponential backoff (``backoff * 2**k``
    seconds with jitter, at most 60 s, or the server's ``Retry-After``); other failures are not retried. The retries
    are counted here, not by the SDK (its client runs with ``max_retries=0``): the SDK's own backoff cannot be set,
    and counting them here gives each failed row its reason (``HTTP 500 after 4 tries``).

    Args:
        base_url: the API base, e.g. ``http://localhost:8000/v1`` (a trailing ``/chat/completions`` is dropped).
        api_key: sent as ``Authorization: Bearer <key>``; None sends no key (and the SDK reads no variable of its
            own for it). Never logged.
        api_key_env: the variable the key came from, named in error messages.
        timeout: seconds per request.
        max_retries: retries of one request after the first try.
        backoff: first retry delay in seconds.
        sleep: the wait between tries (tests replace it).

    Raises:
        ConfigError: the ``openai`` package is not installed.
    """

    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(self, base_url: str, *, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        try:
            import openai
        except ImportError:
            raise ConfigError("the openai reviser (--base_url / --model) needs the openai package: "
                              "pip install 'finegrain[openai]'") from None
        self._openai = openai
        base = base_url.rstrip("/").removesuffix("/chat/completions").rstrip("/")
        self.url = f"{base}/chat/completions"
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.backoff, self.sleep = timeout, max_retries, backoff, sleep
        self._has_key = bool(api_key)
        # The SDK insists on a key; without one it gets a stand-in that is never sent (every request omits the
        # Authorization header), so neither OPENAI_API_KEY nor any other variable is read behind the user's back.
        self._sdk = self._openai.OpenAI(base_url=base, api_key=api_key or "unused", timeout=timeout, max_retries=0)
        omit = getattr(self._openai, "Omit", None) or self._openai._types.Omit  # exported only by newer SDKs
        self._extra = {} if api_key else {"extra_headers": {"Authorization": omit()}}

    def __repr__(self) -> str:  # never shows the key
        return f"ChatCompletionsClient(url={self.url!r}, api_key={'set' if self._has_key else 'none'})"

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(60.0, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(60.0, self.backoff * 2**attempt) * (0.5 + 0.5 * random.random())

    def _fatal(self, status: int, body: str) -> EndpointError:
        detail = f" (server said: {body.strip()[:300]})" if body.strip() else ""
        if status in (401, 403):
            return EndpointError(
                f"{self.url} refused the request with HTTP {status}{detail}: check that the environment variable "
                f"{self.api_key_env} holds a valid API key for this server (set --api_key_env to use another variable)")
        return EndpointError(
            f"{self.url} answered HTTP 404 Not Found{detail}: check --base_url (most servers want it to end in /v1, "
            "e.g. http://localhost:8000/v1) and --model (a name the server serves; see GET <base_url>/models)")

    def complete(self, messages: list[dict[str, str]], *, model: str, temperature: float = 0.0,
                 max_tokens: int = 1024, top_p: float = 1.0) -> tuple[str, str | None]:
        """Send one chat-completions request (``model``, ``messages``, ``temperature``, ``max_tokens``, and
        ``top_p`` below 1).

        Returns:
            ``(content, finish_reason)`` of ``choices[0]``.

        Raises:
            EndpointError: 401/403/404, or no connection to the server after every retry (the job cannot go on).
            RuntimeError: this request failed (another 4xx, a malformed answer, or retries exhausted); the
                message says why and the row counts as failed.
        """
        openai = self._openai
        request: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature,
                                   "max_tokens": max_tokens, **self._extra}
        if top_p < 1.0:
            request["top_p"] = top_p
        last, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(self._delay(attempt - 1, retry_after))
            retry_after = None
            try:
                answer = self._sdk.chat.completions.create(**request)
            except openai.APIStatusError as e:
                status, text = e.status_code, e.response.text
                if status in (401, 403, 404):
                    raise self._fatal(status, text) from None
                if status in self.RETRY_STATUS or status >= 500:
                    last, retry_after = f"HTTP {status}", e.response.headers.get("Retry-After")
                    continue
                raise RuntimeError(f"HTTP {status}: {text.strip()[:300]}") from None
            except openai.APITimeoutError:
                last = "timed out"
                continue
            except openai.APIConnectionError as e:
                reason = _unreachable(e)
                if reason is not None and attempt == self.max_retries:
                    raise EndpointError(f"cannot reach {self.url}: {reason}; check that the server is running and "
                                        "that --base_url is right") from None
                dropped = f"connection dropped ({type(e.__cause__ or e).__name__})"
                last = f"no connection ({reason})" if reason else dropped
                continue
            except openai.APIError as e:  # e.g. an answer the SDK cannot read
                raise RuntimeError(f"malformed chat-completions answer ({type(e).__name__}: {e})") from None
            try:
                choice = answer.choices[0]
                content = choice.message.content
                if not isinstance(content, str):
                    raise TypeError(type(content).__name__)
            except (AttributeError, KeyError, IndexError, TypeError) as e:
                raise RuntimeError(f"malformed chat-completions answer ({type(e).__name__}: {e})") from None
            return content, choice.finish_reason
        raise RuntimeError(f"{last} after {self.max_retries + 1} tries")


class OpenAIReviser:
    """An OpenAI-compatible chat-completions endpoint, ``concurrency`` requests in flight from a thread pool."""

    def __init__(self, client: ChatCompletionsClient, model: str, *, concurrency: int = 8, temperature: float = 0.0,
                 top_p: float = 1.0, max_tokens: int = 1024, max_retries: int = 3):
        self.client, self.model, self.concurrency = client, model, concurrency
        self.temperature, self.top_p, self.max_tokens, self.max_retries = temperature, top_p, max_tokens, max_retries

    def revise_one(self, job: RevisionJob) -> tuple[str | None, str | None]:
        """``(revised, None)`` or ``(None, reason)`` for one row; a reply without the marker is asked again."""
        for _ in range(self.max_retries + 1):
            try:
                reply, finish = self.client.complete(job.messages, model=self.model, temperature=self.temperature,
                                                     max_tokens=self.max_tokens, top_p=self.top_p)
            except RuntimeError as e:
                return None, str(e)
            revised, reason = _judge(reply, finish == "length")
            if revised is not None:
                break
        return revised, reason

    def run(self, jobs: Iterable[RevisionJob]) -> Iterator[Result]:
        it = iter(jobs)
        pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="finegrain-revise")
        pending: dict[cf.Future, RevisionJob] = {}
        try:
            while True:  # at most 2 * concurrency rows submitted and not yet yielded
                for job in itertools.islice(it, 2 * self.concurrency - len(pending)):
                    pending[pool.submit(self.revise_one, job)] = job
                if not pending:
                    break
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    yield pending.pop(fut), *fut.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
