"""``finegrain label revise``: minimal-edit revisions of rejected responses (spec/ALGORITHMS.md 3.1 and 4.1).

For every preference pair, a reviser rewrites the rejected response with the fewest edits that make it
preferable. The revisions feed the token labels of TLCR and of the minimal-edit token reward model
(``finegrain label edits``). Three revisers:

* ``world``: the built-in world's rule-based reviser (:func:`finegrain.world.reviser.revise`) on the world's
  pairs; the default when no data set is given;
* ``hf``: a local Hugging Face chat model, prompted through its chat template, batched;
* ``openai``: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, llama.cpp, TGI ...), through
  a standard-library HTTP client with retries, timeouts and a concurrency limit.

An LLM reviser is asked (:data:`REVISER_PROMPT`) to compare the responses, explain, then print the marker line
:data:`MARKER` and only the rewritten response; the text after the marker is the revision. A reply without the
marker (or cut off at ``max_tokens``) is a failed row: it is asked again up to ``max_retries`` times, then
counted and reported.

The output is resumable. Each finished row is appended to ``output_file`` at once (one JSON line, flushed) with
``index``, its 0-based position in the input split; a second run skips every index already there, so an
interrupted job loses nothing and repeats nothing. Revisions identical to the rejected response are counted and,
unless ``keep_unchanged``, recorded in a side file ``<output stem>.unchanged.jsonl`` instead, so that they are
not asked again either. Failed rows are not recorded: running the same command again retries them.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import http.client
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from finegrain.config import option
from finegrain.errors import ConfigError, DataError, FinegrainError

__all__ = [
    "MARKER",
    "REVISER_PROMPT",
    "REVISER_PROMPT_NO_CHOSEN",
    "REVISER_SYSTEM",
    "ChatCompletionsClient",
    "EndpointError",
    "HFReviser",
    "OpenAIReviser",
    "ReviseConfig",
    "ReviseSummary",
    "RevisionJob",
    "WorldReviser",
    "build_messages",
    "conversation_text",
    "load_jobs",
    "make_reviser",
    "parse_revision",
    "run_revise",
    "unchanged_path",
]

logger = logging.getLogger(__name__)

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
"""The reviser's instruction for a pair (spec 3.1 PROPOSAL); ``{prompt}``, ``{chosen}``, ``{rejected}`` are filled."""

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
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ID_COLUMNS = ("id", "idx", "uid")


DESCRIPTION = f"""Minimal-edit revisions of rejected responses, by an LLM or the built-in world's reviser.

Each row of the input (prompt, rejected, optionally chosen) is sent to the reviser, which explains and then prints
the line {MARKER} followed by the rewritten response. Finished rows are appended to --output_file as
JSON Lines {{index, [id], prompt, rejected, revised, chosen}}; running the same command again skips the rows already
there and retries the failed ones. The API key of an endpoint is read from the environment variable named by
--api_key_env, never from a config.

examples:
  finegrain label revise --world_dir world --output_file revisions.jsonl
  finegrain label revise --dataset_name pairs.jsonl --base_url http://localhost:8000/v1 --model Qwen/Qwen2.5-7B-Instruct --output_file revisions.jsonl
  finegrain label revise --dataset_name pairs.jsonl --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --output_file revisions.jsonl
"""


class EndpointError(FinegrainError):
    """The chat-completions endpoint cannot serve this job (bad URL, model, key, or unreachable): stop."""


# ------------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass
class ReviseConfig:
    """Minimal-edit revisions of rejected responses by an LLM or the built-in world's reviser.

    Writes JSON Lines {index, [id], prompt, rejected, revised, chosen}; a re-run skips rows already written.
    """

    output_file: str = option(help="JSONL file the revisions are appended to (created if missing; a re-run resumes it)")
    # input
    dataset_name: str | None = option(None, "hub id, local file (.jsonl/.json/.parquet/.csv) or directory of rows with "
                                      "prompt, rejected and optionally chosen (TRL preference format, standard or "
                                      "conversational); default: the world's data/pairs_train.jsonl")
    dataset_split: str = option("train", "split of dataset_name")
    world_dir: str | None = option(None, "a built world directory (finegrain world build DIR); needed by --reviser world")
    limit: int | None = option(None, "use only the first N input rows (a later run with a larger limit continues)")
    skip_invalid_rows: bool = option(False, "skip bad input rows (counted and logged) instead of stopping with an error")
    # reviser
    reviser: Literal["world", "hf", "openai"] | None = option(
        None, "who revises: world (rule-based, the built-in world), hf (local chat model), openai (chat-completions "
        "endpoint); default: world without a data set, else hf with --model_name_or_path, else openai")
    prompt_template: str | None = option(None, "text file with the reviser's instruction ({prompt}, {rejected} and "
                                         "{chosen} are filled in; it must ask for the marker line); default: built in")
    max_retries: int = option(3, "times a failed request or a reply without the marker is tried again")
    temperature: float = option(0.0, "sampling temperature of the LLM reviser (0: greedy)")
    top_p: float = option(1.0, "nucleus sampling of the LLM reviser (with temperature > 0)")
    max_tokens: int = option(1024, "most tokens the LLM reviser may generate per reply (explanation and revision)",
                             aliases=("max_new_tokens",))
    keep_unchanged: bool = option(False, "also write rows whose revision equals the rejected response (default: "
                                  "counted and left out)")
    overwrite_output: bool = option(False, "start afresh: delete output_file (and its .unchanged side file) first")
    disable_tqdm: bool = option(False, "hide the progress bar")
    # world reviser
    max_edits: int | None = option(None, "world reviser: most edits per response; default: the world's "
                                   "revision_max_edits")
    # local Hugging Face chat model
    model_name_or_path: str | None = option(None, "hf reviser: hub id or local path of a chat model (it needs a chat "
                                            "template)")
    trust_remote_code: bool = option(False, "hf reviser: allow custom model code from the hub")
    dtype: str | None = option(None, "hf reviser: float32, bfloat16, float16 or auto (default: float32)")
    device: str | None = option(None, "hf reviser: torch device (default: cuda when available, else cpu)")
    batch_size: int = option(8, "hf reviser: prompts generated together")
    seed: int = option(0, "hf reviser: sampling seed")
    # OpenAI-compatible endpoint
    base_url: str | None = option(None, "openai reviser: API base URL, e.g. http://localhost:8000/v1 (default: "
                                  "https://api.openai.com/v1)")
    model: str | None = option(None, "openai reviser: model name the endpoint serves")
    api_key_env: str = option("OPENAI_API_KEY", "openai reviser: NAME of the environment variable that holds the API "
                              "key (the key itself never goes in a config); unset: no key is sent")
    timeout: float = option(120.0, "openai reviser: seconds to wait for one reply")
    concurrency: int = option(8, "openai reviser: requests in flight at once")
    retry_backoff: float = option(1.0, "openai reviser: first retry waits this many seconds, doubling each time (up "
                                  "to 60 s; a Retry-After header is honoured)")

    def __post_init__(self) -> None:
        for name in ("max_tokens", "batch_size", "concurrency"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"option '{name}' must be positive, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ConfigError(f"option 'max_retries' must be >= 0, got {self.max_retries}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(f"option 'limit' must be positive (or unset for all rows), got {self.limit}")
        if self.max_edits is not None and self.max_edits <= 0:
            raise ConfigError(f"option 'max_edits' must be positive, got {self.max_edits}")
        if self.timeout <= 0 or self.retry_backoff < 0:
            raise ConfigError("options 'timeout' must be > 0 and 'retry_backoff' >= 0")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"temperature must be >= 0 and top_p in (0, 1]; got {self.temperature}, {self.top_p}")
        if not self.output_file:
            raise ConfigError("give --output_file, the JSONL file to write the revisions to")
        if not _ENV_NAME.fullmatch(self.api_key_env):
            raise ConfigError(
                "option 'api_key_env' is the NAME of the environment variable that holds the key (e.g. OPENAI_API_KEY), "
                "not the key itself: export the key in that variable and never put it in a config"
            )
        backend = self.backend  # resolves, and checks the options it needs
        if backend == "world" and not self.world_dir:
            raise ConfigError("--reviser world needs --world_dir DIR (a world built by `finegrain world build DIR`)")
        if backend != "world" and not (self.dataset_name or self.world_dir):
            raise ConfigError("give --dataset_name (the pairs to revise) or --world_dir (revise the world's pairs)")
        if backend == "hf" and not self.model_name_or_path:
            raise ConfigError("--reviser hf needs --model_name_or_path (a local path or hub id of a chat model)")
        if backend == "openai" and not self.model:
            raise ConfigError("--reviser openai needs --model, the model name the endpoint serves")
        if backend == "world" and (self.model_name_or_path or self.model or self.base_url):
            raise ConfigError("--reviser world uses the world's rule-based reviser: drop --model_name_or_path, "
                              "--model and --base_url, or choose --reviser hf / openai")

    @property
    def backend(self) -> str:
        """The reviser that runs: ``reviser`` if set, else inferred from the other options."""
        if self.reviser is not None:
            return self.reviser
        if not self.dataset_name and not (self.model_name_or_path or self.model or self.base_url):
            return "world"
        if self.model_name_or_path:
            return "hf"
        if self.model or self.base_url:
            return "openai"
        raise ConfigError(
            "a data set needs an LLM reviser: give --model_name_or_path (a local Hugging Face chat model) or "
            "--base_url and --model (an OpenAI-compatible endpoint), or --reviser world"
        )


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


def _with_spacing(revised: str, rejected: str) -> str:
    """``revised`` with the leading and trailing whitespace of ``rejected`` (TRL responses often start with a
    space that belongs to the response's first token)."""
    core = revised.strip()
    lead = rejected[: len(rejected) - len(rejected.lstrip())]
    trail = rejected[len(rejected.rstrip()):] if rejected.strip() else ""
    return f"{lead}{core}{trail}"


# --------------------------------------------------------------------------------------------------------- input


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


def _id_columns(raw: dict) -> dict[str, Any]:
    return {k: v for k, v in raw.items()
            if (k in _ID_COLUMNS or k.endswith("_id")) and isinstance(v, (str, int)) and not isinstance(v, bool)}


def _check_row(raw: dict, source: str, row: int) -> dict[str, Any]:
    """Prompt and rejected text of a row without ``chosen`` (text or messages, as :mod:`finegrain.data.schema`)."""
    from finegrain.data.schema import row_error

    def fail(reason: str, field: str, detail: str = "") -> DataError:
        return row_error(reason, source=source, row=row, field=field, detail=detail)

    prompt, rejected = raw.get("prompt"), raw.get("rejected")
    prompt_text = prompt
    if isinstance(prompt, list):
        for j, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise fail("wrong type", "prompt", f"message {j} must be {{'role': str, 'content': str}}")
        prompt, prompt_text = [dict(m) for m in prompt], "".join(m["content"] for m in prompt)
    if isinstance(rejected, list):
        if len(rejected) != 1 or not isinstance(rejected[0], dict) or rejected[0].get("role") != "assistant":
            raise fail("wrong type", "rejected", "a conversational response must be one assistant message")
        rejected = rejected[0].get("content")
    for field, value, what in (("prompt", prompt_text, "prompt"), ("rejected", rejected, "response")):
        if value is None:
            raise fail("missing value", field)
        if not isinstance(value, str):
            raise fail("wrong type", field, f"expected a string or messages, got {type(value).__name__}")
        if not value.strip():
            raise fail(f"empty {what}", field)
    return {"prompt": prompt, "rejected": rejected, "chosen": None, "source": source, "row": row}


def load_jobs(rows: Any, *, template: str | None = None, skip_invalid: bool = False,
              skipped: collections.Counter | None = None) -> list[RevisionJob]:
    """Validate input rows into :class:`RevisionJob` s.

    Rows with ``chosen`` are read as TRL preference rows (explicit or implicit prompt, standard or
    conversational, see :mod:`finegrain.data.schema`); rows without it need ``prompt`` and ``rejected``.

    Raises:
        DataError: naming the file, the row and the field of the first bad row (unless ``skip_invalid``).
    """
    from finegrain.data.loading import load_rows
    from finegrain.data.schema import log_skips, skip_key, validate_rows

    rows = load_rows(rows)
    columns = set(rows.column_names)
    if "rejected" not in columns:
        raise DataError(f"missing column 'rejected'; rows to revise need prompt, rejected and optionally chosen "
                        f"(columns found: {', '.join(sorted(columns)) or 'none'})", source=rows.source, field="rejected")
    if "chosen" in columns:
        position = {rows.locate(i): i for i in range(len(rows))}
        items = validate_rows(rows, "preference", skip_invalid=skip_invalid, skipped=skipped)
        normal = [(position[it["source"], it["row"]], it) for it in items]
    else:
        if "prompt" not in columns:
            raise DataError("missing column 'prompt'; without a chosen response the prompt must be given in its own "
                            "column", source=rows.source, field="prompt")
        normal, counts = [], collections.Counter()
        for i, raw in enumerate(rows):
            source, row = rows.locate(i)
            try:
                normal.append((i, _check_row(raw, source, row)))
            except DataError as e:
                if not skip_invalid:
                    raise
                counts[skip_key(e)] += 1
        log_skips(counts, rows.source, len(rows), "validation")
        if skipped is not None:
            skipped.update(counts)
    jobs = []
    for index, it in normal:
        if template is not None and "{chosen}" in template and it["chosen"] is None:
            raise DataError("the reviser prompt template uses {chosen} but this row has no chosen response",
                            source=it["source"], row=it["row"], field="chosen")
        jobs.append(RevisionJob(index, it["prompt"], it["rejected"], it["chosen"], _id_columns(rows[index]), template))
    return jobs


def _read_template(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompt_template: file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    if "{rejected}" not in text:
        raise ConfigError(f"prompt_template {p} must contain {{rejected}}, where the response to revise goes")
    if MARKER not in text:
        raise ConfigError(f"prompt_template {p} must ask for the marker line {MARKER} (the revision is read after it)")
    return text


# ------------------------------------------------------------------------------------------------------ revisers

# A reviser's ``run(jobs)`` yields ``(job, revised_text, None)`` or ``(job, None, failure_reason)`` per job, in any
# order, as each finishes. A revised text equal to the rejected response means "nothing to change".
Result = tuple[RevisionJob, "str | None", "str | None"]


class WorldReviser:
    """The built-in world's rule-based reviser (no LLM, no marker)."""

    def __init__(self, rules: Any = None, max_edits: int = 2):
        from finegrain.world.oracle import OracleRules

        self.rules = rules if rules is not None else OracleRules()
        self.max_edits = max_edits

    def run(self, jobs: Iterable[RevisionJob]) -> Iterator[Result]:
        from finegrain.world.reviser import revise

        for job in jobs:
            out = revise(conversation_text(job.prompt), job.rejected, max_edits=self.max_edits, rules=self.rules)
            yield job, (job.rejected if out is None else out), None


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

    def _eos_ids(self) -> set[int]:
        ids = set()
        for value in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if value is not None:
                ids.update(value if isinstance(value, (list, tuple)) else [value])
        return ids

    def generate(self, conversations: list[list[dict[str, str]]]) -> list[tuple[str, bool]]:
        """``(reply, cut_off)`` per conversation: the decoded new tokens, and whether ``max_new_tokens`` ended it."""
        import torch

        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok([self.render(m) for m in conversations], return_tensors="pt", padding=True,
                      add_special_tokens=False)
        finally:
            tok.padding_side = side
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "pad_token_id": tok.pad_token_id}
        if self.model.generation_config.eos_token_id is None and tok.eos_token_id is not None:
            kwargs["eos_token_id"] = tok.eos_token_id
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        eos = self._eos_ids()
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
                revised = None if cut_off else parse_revision(reply)
                if revised is not None:
                    yield job, revised, None
                    continue
                tries[job.index] += 1
                if tries[job.index] <= self.max_retries:
                    queue.append(job)
                else:
                    yield job, None, ("reply cut off at max_tokens" if cut_off else "reply without the marker")


class ChatCompletionsClient:
    """A minimal client of the OpenAI chat-completions protocol on the standard library (``urllib``).

    Retries 408, 409, 429, 5xx, timeouts and dropped connections with exponential backoff (``backoff * 2**k``
    seconds with jitter, at most 60 s, or the server's ``Retry-After``); other failures are not retried.

    Args:
        base_url: the API base, e.g. ``http://localhost:8000/v1``; ``/chat/completions`` is appended unless
            the URL already ends with it.
        api_key: sent as ``Authorization: Bearer <key>``; None sends no key. Never logged.
        api_key_env: the variable the key came from, named in error messages.
        timeout: seconds per request.
        max_retries: retries of one request after the first try.
        backoff: first retry delay in seconds.
    """

    RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

    def __init__(self, base_url: str, *, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 3, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self._api_key = api_key
        self.api_key_env = api_key_env
        self.timeout, self.max_retries, self.backoff, self.sleep = timeout, max_retries, backoff, sleep
        self._opener = urllib.request.build_opener()

    def __repr__(self) -> str:  # never shows the key
        return f"ChatCompletionsClient(url={self.url!r}, api_key={'set' if self._api_key else 'none'})"

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
        """Send one chat-completions request.

        Returns:
            ``(content, finish_reason)`` of ``choices[0]``.

        Raises:
            EndpointError: 401/403/404, or no connection to the server after every retry (the job cannot go on).
            RuntimeError: this request failed (another 4xx, a malformed answer, or retries exhausted); the
                message says why and the row counts as failed.
        """
        payload: dict[str, Any] = {"model": model, "messages": messages, "temperature": temperature,
                                   "max_tokens": max_tokens}
        if top_p < 1.0:
            payload["top_p"] = top_p
        data = json.dumps(payload).encode("utf-8")
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "finegrain"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last, retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(self._delay(attempt - 1, retry_after))
            retry_after = None
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as e:
                text = e.read().decode("utf-8", "replace") if e.fp is not None else ""
                if e.code in (401, 403, 404):
                    raise self._fatal(e.code, text) from None
                if e.code in self.RETRY_STATUS or e.code >= 500:
                    last, retry_after = f"HTTP {e.code}", e.headers.get("Retry-After") if e.headers else None
                    continue
                raise RuntimeError(f"HTTP {e.code}: {text.strip()[:300]}") from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    last = "timed out"
                    continue
                last = f"no connection ({e.reason})"
                if attempt == self.max_retries:
                    raise EndpointError(f"cannot reach {self.url}: {e.reason}; check that the server is running and "
                                        "that --base_url is right") from None
                continue
            except TimeoutError:
                last = "timed out"
                continue
            except (http.client.HTTPException, ConnectionError) as e:
                last = f"connection dropped ({type(e).__name__})"
                continue
            try:
                choice = json.loads(body)["choices"][0]
                content = choice["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError(type(content).__name__)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise RuntimeError(f"malformed chat-completions answer ({type(e).__name__}: {e})") from None
            return content, choice.get("finish_reason")
        raise RuntimeError(f"{last} after {self.max_retries + 1} tries")


class OpenAIReviser:
    """An OpenAI-compatible chat-completions endpoint, ``concurrency`` requests in flight from a thread pool."""

    def __init__(self, client: ChatCompletionsClient, model: str, *, concurrency: int = 8, temperature: float = 0.0,
                 top_p: float = 1.0, max_tokens: int = 1024, max_retries: int = 3):
        self.client, self.model, self.concurrency = client, model, concurrency
        self.temperature, self.top_p, self.max_tokens, self.max_retries = temperature, top_p, max_tokens, max_retries

    def revise_one(self, job: RevisionJob) -> tuple[str | None, str | None]:
        """``(revised, None)`` or ``(None, reason)`` for one row; a reply without the marker is asked again."""
        reason = ""
        for _ in range(self.max_retries + 1):
            try:
                reply, finish = self.client.complete(job.messages, model=self.model, temperature=self.temperature,
                                                     max_tokens=self.max_tokens, top_p=self.top_p)
            except RuntimeError as e:
                return None, str(e)
            revised = parse_revision(reply)
            if finish == "length":
                reason = "reply cut off at max_tokens"
            elif revised is None:
                reason = "reply without the marker"
            else:
                return revised, None
        return None, reason

    def run(self, jobs: Iterable[RevisionJob]) -> Iterator[Result]:
        it = iter(jobs)
        window = 2 * self.concurrency
        pool = cf.ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="finegrain-revise")
        pending: dict[cf.Future, RevisionJob] = {}
        try:
            while True:
                while len(pending) < window:
                    job = next(it, None)
                    if job is None:
                        break
                    pending[pool.submit(self.revise_one, job)] = job
                if not pending:
                    break
                done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    job = pending.pop(fut)
                    revised, reason = fut.result()
                    yield job, revised, reason
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ output, resume


@dataclasses.dataclass
class ReviseSummary:
    """What a run did. ``revised + unchanged + failed`` rows were worked on; ``skipped`` were already done."""

    output_file: str
    total: int = 0
    revised: int = 0
    unchanged: int = 0
    failed: int = 0
    skipped: int = 0
    invalid: int = 0
    failures: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    keep_unchanged: bool = False

    def __str__(self) -> str:
        unchanged = f"{self.unchanged} unchanged ({'kept' if self.keep_unchanged else 'left out'})"
        why = ", ".join(f"{k}: {v}" for k, v in self.failures.most_common())
        failed = f"{self.failed} failed" + (f" ({why})" if why else "")
        lines = [f"{self.revised} revised, {unchanged}, {failed}, {self.skipped} already done "
                 f"(of {self.total} input rows" + (f"; {self.invalid} invalid rows skipped" if self.invalid else "")
                 + f") -> {self.output_file}"]
        if self.failed:
            lines.append("run the same command again to retry the failed rows")
        return "\n".join(lines)


def unchanged_path(output_file: str | Path) -> Path:
    """The side file that records rows whose revision equals the rejected response."""
    p = Path(output_file)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(f"{stem}.unchanged.jsonl")


def _read_done(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of every complete line of ``path``; a torn last line (a killed writer) is cut off."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        logger.warning("%s: dropping an incomplete last line (the previous run was interrupted while writing)", path)
        with path.open("r+b") as f:
            f.truncate(cut)
        raw = raw[:cut]
    out = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            index = row["index"]
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise DataError(f"line {lineno} is not a row written by finegrain label revise (no integer 'index'); "
                            "use another --output_file or --overwrite_output", source=str(path), row=len(out),
                            field="index") from None
        out.append((lineno, row))
    return out


def _done_indices(cfg: ReviseConfig, jobs_by_index: dict[int, RevisionJob], n_rows: int) -> set[int]:
    done: set[int] = set()
    out = Path(cfg.output_file)
    for path in (out, unchanged_path(out)):
        for lineno, row in _read_done(path):
            i = row["index"]
            job = jobs_by_index.get(i)
            stale = not 0 <= i < n_rows or (job is not None and "rejected" in row and row["rejected"] != job.rejected)
            if stale:
                raise DataError(f"line {lineno} (index {i}) does not match row {i} of the input: this file holds "
                                "revisions of another data set; use another --output_file or --overwrite_output",
                                source=str(path), row=lineno - 1, field="rejected")
            done.add(i)
    return done


def _output_row(job: RevisionJob, revised: str) -> dict[str, Any]:
    row: dict[str, Any] = {"index": job.index, **job.ids, "prompt": job.prompt, "rejected": job.rejected,
                           "revised": revised}
    if job.chosen is not None:
        row["chosen"] = job.chosen
    return row


# ----------------------------------------------------------------------------------------------------------- run


def _world_settings(world_dir: Path) -> tuple[Any, int]:
    """The oracle rules and revision_max_edits of a built world (defaults when it has no world.json)."""
    from finegrain.world.config import WorldConfig

    meta = world_dir / "world.json"
    if not meta.is_file():
        return WorldConfig().rules, WorldConfig().revision_max_edits
    try:
        cfg = WorldConfig(**json.loads(meta.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta} is not a world summary finegrain can read ({e}); rebuild the world") from None
    return cfg.rules, cfg.revision_max_edits


def _input_source(cfg: ReviseConfig) -> str:
    if cfg.dataset_name:
        return cfg.dataset_name
    pairs = Path(cfg.world_dir) / "data" / "pairs_train.jsonl"
    if not pairs.is_file():
        raise ConfigError(f"world dir {cfg.world_dir} has no data/pairs_train.jsonl: build it with "
                          f"`finegrain world build {cfg.world_dir}` or give --dataset_name")
    return str(pairs)


def make_reviser(cfg: ReviseConfig) -> WorldReviser | HFReviser | OpenAIReviser:
    """Build the reviser ``cfg`` asks for (loads the model for ``hf``; reads the key's variable for ``openai``)."""
    backend = cfg.backend
    if backend == "world":
        rules, max_edits = _world_settings(Path(cfg.world_dir))
        return WorldReviser(rules, cfg.max_edits or max_edits)
    if backend == "hf":
        import torch

        from finegrain.models.loading import load_causal_lm, load_tokenizer

        tok = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
        model = load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype)
        model.to(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return HFReviser(model, tok, batch_size=cfg.batch_size, max_new_tokens=cfg.max_tokens,
                         temperature=cfg.temperature, top_p=cfg.top_p, max_retries=cfg.max_retries, seed=cfg.seed)
    key = os.environ.get(cfg.api_key_env) or None
    if key is None:
        logger.info("environment variable %s is not set: requests carry no API key", cfg.api_key_env)
    client = ChatCompletionsClient(cfg.base_url or "https://api.openai.com/v1", api_key=key,
                                   api_key_env=cfg.api_key_env, timeout=cfg.timeout, max_retries=cfg.max_retries,
                                   backoff=cfg.retry_backoff)
    return OpenAIReviser(client, cfg.model, concurrency=cfg.concurrency, temperature=cfg.temperature, top_p=cfg.top_p,
                         max_tokens=cfg.max_tokens, max_retries=cfg.max_retries)


def run_revise(cfg: ReviseConfig, reviser: WorldReviser | HFReviser | OpenAIReviser | None = None) -> ReviseSummary:
    """Revise the rejected responses of ``cfg``'s data set into ``cfg.output_file``, resuming what is there.

    Args:
        cfg: the options.
        reviser: a reviser to use instead of the one ``cfg`` describes (e.g. an :class:`HFReviser` on a model
            already in memory).

    Returns:
        The :class:`ReviseSummary`.

    Raises:
        DataError: a bad input row, or an output file written from other input.
        ConfigError / EndpointError: options or an endpoint that cannot work; rows finished so far stay written.
    """
    from finegrain.data.loading import load_rows

    source = _input_source(cfg)
    out = Path(cfg.output_file)
    if out.resolve() == Path(source).resolve():
        raise ConfigError(f"--output_file {out} is the input file: choose another path")
    template = _read_template(cfg.prompt_template) if cfg.prompt_template else None
    rows = load_rows(source, cfg.dataset_split if cfg.dataset_name else None)
    n_rows = len(rows)
    if cfg.limit is not None:
        rows = rows.head(cfg.limit)
    invalid: collections.Counter = collections.Counter()
    jobs = load_jobs(rows, template=template, skip_invalid=cfg.skip_invalid_rows, skipped=invalid)
    if cfg.overwrite_output:
        for p in (out, unchanged_path(out)):
            p.unlink(missing_ok=True)
    done = _done_indices(cfg, {j.index: j for j in jobs}, n_rows)
    todo = [j for j in jobs if j.index not in done]
    summary = ReviseSummary(str(out), total=len(rows), skipped=len(jobs) - len(todo), invalid=sum(invalid.values()),
                            keep_unchanged=cfg.keep_unchanged)
    if todo:
        reviser = reviser or make_reviser(cfg)
        out.parent.mkdir(parents=True, exist_ok=True)
        _revise_into(reviser, todo, out, cfg, summary)
    return summary


def _append(f: Any, row: dict[str, Any]) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


def _revise_into(reviser: Any, todo: list[RevisionJob], out: Path, cfg: ReviseConfig, summary: ReviseSummary) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="revise", unit="row", disable=cfg.disable_tqdm, dynamic_ncols=True)
    side = None
    try:
        with out.open("a", encoding="utf-8") as f:
            for job, revised, reason in reviser.run(todo):
                if revised is None:
                    reason = reason or "failed"
                    key = reason.split(":", 1)[0]  # "HTTP 400: <server text>" is counted as "HTTP 400"
                    if key not in summary.failures:
                        logger.warning("row %d failed: %s", job.index, reason)
                    summary.failed += 1
                    summary.failures[key] += 1
                elif revised.strip() == job.rejected.strip():
                    summary.unchanged += 1
                    if cfg.keep_unchanged:
                        _append(f, _output_row(job, job.rejected))
                    else:
                        side = side or unchanged_path(out).open("a", encoding="utf-8")
                        _append(side, {"index": job.index, "rejected": job.rejected})
                else:
                    summary.revised += 1
                    _append(f, _output_row(job, _with_spacing(revised, job.rejected)))
                bar.update(1)
                bar.set_postfix(revised=summary.revised, unchanged=summary.unchanged, failed=summary.failed,
                                refresh=False)
    finally:
        bar.close()
        if side is not None:
            side.close()
