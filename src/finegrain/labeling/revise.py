"""``finegrain label revise``: minimal-edit revisions of rejected responses, resumable (docs/labeling.md).

For every preference pair, a reviser rewrites the rejected response with the fewest edits that make it
preferable. The revisions feed the token labels of TLCR (Yoon et al., ACL Findings 2024) and of the minimal-edit
token reward model (Xu et al., ACL 2024) through ``finegrain label edits``. This module is the runner: the options
(:class:`ReviseConfig`), the rows to revise (:func:`load_jobs`), the resumable output and the loop
(:func:`run_revise`). The revisers are backends picked by name (``--reviser``) from the registry of
:mod:`finegrain.labeling.revisers`: ``hf`` and ``openai`` from the library, more from applications
(:func:`~finegrain.labeling.revisers.register_reviser`).

The output is resumable: each finished row is appended at once with ``index``, its 0-based position in the input
split, and a second run skips every index already in the output or its side file of unchanged rows
(:func:`unchanged_path`); failed rows are not recorded, so they are retried (docs/labeling.md, "Output", "Resuming").
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from finegrain.config import check_ranges, option
from finegrain.errors import ConfigError, DataError
from finegrain.labeling.revisers import (
    DEFAULT_BASE_URL,
    MARKER,
    ChatCompletionsClient,
    EndpointError,
    HFReviser,
    OpenAIReviser,
    Reviser,
    RevisionJob,
    read_prompt_template,
    register_reviser,
    registered_revisers,
    reviser_factory,
)

__all__ = ["EndpointError", "ReviseConfig", "ReviseSummary", "RevisionJob", "load_jobs", "make_reviser",
           "run_revise", "unchanged_path"]

logger = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ID_COLUMNS = ("id", "idx", "uid")

DESCRIPTION = f"""Minimal-edit revisions of rejected responses, by an LLM or a registered rule reviser.

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

_NEEDS_REVISER = ("a data set needs an LLM reviser: give --model_name_or_path (a local Hugging Face chat model) or "
                  "--base_url and --model (an OpenAI-compatible endpoint), or name a registered reviser with --reviser")


# ------------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass
class ReviseConfig:
    """Minimal-edit revisions of rejected responses by an LLM or a registered rule reviser (the command's help:
    :data:`DESCRIPTION`)."""

    output_file: str = option(help="JSONL file the revisions are appended to (created if missing; a re-run resumes it)")
    # input
    dataset_name: str | None = option(None, "hub id, local file (.jsonl/.json/.parquet/.csv) or directory of rows with "
                                      "prompt, rejected and optionally chosen (TRL preference format, standard or "
                                      "conversational)")
    dataset_split: str = option("train", "split of dataset_name")
    limit: int | None = option(None, "use only the first N input rows (a later run with a larger limit continues)")
    skip_invalid_rows: bool = option(False, "skip bad input rows (counted and logged) instead of stopping with an error")
    # reviser
    reviser: str | None = option(
        None, "who revises, a registered reviser: hf (a local chat model), openai (an OpenAI-compatible chat-completions "
        "endpoint; pip install 'finegrain[openai]'), or one an application registers (the finegrain command adds "
        "world, the built-in world's rule reviser); default: hf with --model_name_or_path, openai with --model or "
        "--base_url")
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
    # rule revisers
    max_edits: int | None = option(None, "rule revisers (such as the built-in world's): most edits per response; "
                                   "default: the reviser's own (the world's revision_max_edits)")
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
        check_ranges(self, positive=("max_tokens", "batch_size", "concurrency", "max_edits", "limit", "timeout"),
                     nonnegative=("max_retries", "retry_backoff", "temperature"), unit_interval=("top_p",))
        if not self.output_file:
            raise ConfigError("give --output_file, the JSONL file to write the revisions to")
        if not _ENV_NAME.fullmatch(self.api_key_env):
            raise ConfigError(
                "option 'api_key_env' is the NAME of the environment variable that holds the key (e.g. OPENAI_API_KEY), "
                "not the key itself: export the key in that variable and never put it in a config"
            )
        if self.reviser is not None and not self.reviser.strip():
            raise ConfigError(f"option 'reviser' needs a name; registered: {', '.join(registered_revisers())}")
        # Names are checked against the registry when the run starts: an application (the finegrain command) may
        # register its revisers after the options are read.
        backend = self._backend()
        if backend == "hf" and not self.model_name_or_path:
            raise ConfigError("--reviser hf needs --model_name_or_path (a local path or hub id of a chat model)")
        if backend == "openai" and not self.model:
            raise ConfigError("--reviser openai needs --model, the model name the endpoint serves")
        if backend is None and self.dataset_name:
            raise ConfigError(_NEEDS_REVISER)
        if not self.dataset_name and (self.model_name_or_path or self.model or self.base_url):
            raise ConfigError("give --dataset_name, the pairs to revise")

    def _backend(self) -> str | None:
        return self.reviser or ("hf" if self.model_name_or_path else "openai" if self.model or self.base_url else None)

    @property
    def backend(self) -> str:
        """The reviser that runs: ``reviser`` if set, else ``hf`` or ``openai`` from the model options."""
        if (backend := self._backend()) is None:
            raise ConfigError(_NEEDS_REVISER)
        return backend


# ------------------------------------------------------------------------------------------------------- input


def _with_spacing(revised: str, rejected: str) -> str:
    """``revised`` with the leading and trailing whitespace of ``rejected`` (TRL responses often start with a
    space that belongs to the response's first token)."""
    lead = rejected[: len(rejected) - len(rejected.lstrip())]
    trail = rejected[len(rejected.rstrip()):] if rejected.strip() else ""
    return f"{lead}{revised.strip()}{trail}"


def _id_columns(raw: dict) -> dict[str, Any]:
    return {k: v for k, v in raw.items()
            if (k in _ID_COLUMNS or k.endswith("_id")) and isinstance(v, (str, int)) and not isinstance(v, bool)}


def load_jobs(rows: Any, *, template: str | None = None, skip_invalid: bool = False,
              skipped: collections.Counter | None = None) -> list[RevisionJob]:
    """Validate input rows into :class:`RevisionJob` s.

    Rows with ``chosen`` are read as TRL preference rows (explicit or implicit prompt, standard or
    conversational, see :mod:`finegrain.data.schema`); rows without it need ``prompt`` and ``rejected``.

    Raises:
        DataError: naming the file, the row and the field of the first bad row (unless ``skip_invalid``).
    """
    from finegrain.data.loading import load_rows
    from finegrain.data.schema import RowCheck, log_skips, row_error, skip_key, validate_rows

    rows = load_rows(rows)
    columns = set(rows.column_names)
    if "rejected" not in columns:
        raise DataError(f"missing column 'rejected'; rows to revise need prompt, rejected and optionally chosen "
                        f"(columns found: {', '.join(sorted(columns)) or 'none'})", source=rows.source, field="rejected")
    if "chosen" not in columns and "prompt" not in columns:
        raise DataError("missing column 'prompt'; without a chosen response the prompt must be given in its own "
                        "column", source=rows.source, field="prompt")
    normal, counts = [], collections.Counter()
    if "chosen" in columns:
        position = {rows.locate(i): i for i in range(len(rows))}
        items = validate_rows(rows, "preference", skip_invalid=skip_invalid, skipped=skipped)
        checked = [(position[it["source"], it["row"]], it) for it in items]
    else:
        checked = ((i, raw) for i, raw in enumerate(rows))
    for i, it in checked:
        try:
            if "chosen" not in columns:  # prompt and rejected checked by the preference schema's field checks
                r = RowCheck(it, *rows.locate(i))
                it = {"prompt": r.prompt(r.get("prompt")), "rejected": r.response(r.get("rejected"), "rejected"),
                      "chosen": None, "source": r.source, "row": r.row}
            elif not it["rejected"].strip():  # kept by the preference schema (an EOS-only sample): nothing to edit
                raise row_error("empty response", source=it["source"], row=it["row"], field="rejected")
            normal.append((i, it))
        except DataError as e:
            if not skip_invalid:
                raise
            counts[skip_key(e)] += 1
    log_skips(counts, rows.source, len(rows), "validation", skipped)
    if normal and template is not None and "{chosen}" in template and "chosen" not in columns:
        # rows with a chosen column all have one (the preference schema needs it)
        raise DataError("the reviser prompt template uses {chosen} but this row has no chosen response",
                        source=normal[0][1]["source"], row=normal[0][1]["row"], field="chosen")
    return [RevisionJob(i, it["prompt"], it["rejected"], it["chosen"], _id_columns(rows[i]), template)
            for i, it in normal]


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
    return p.with_name(f"{p.name.removesuffix('.jsonl')}.unchanged.jsonl")


def _done_indices(out: Path, jobs_by_index: dict[int, RevisionJob], n_rows: int) -> set[int]:
    """The indices already in ``out`` and its side file, checked against the input rows; a torn last line (a
    killed writer) is cut off first."""
    done: set[int] = set()
    for path in (out, unchanged_path(out)):
        raw = path.read_bytes() if path.exists() else b""
        if raw and not raw.endswith(b"\n"):
            logger.warning("%s: dropping an incomplete last line (the previous run was interrupted while writing)",
                           path)
            with path.open("r+b") as f:
                f.truncate(raw.rfind(b"\n") + 1)
        rows: list[tuple[int, dict]] = []  # (line number, row) of every complete line
        for lineno, line in enumerate(raw.split(b"\n")[:-1], start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if isinstance(row["index"], bool) or not isinstance(row["index"], int):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise DataError(f"line {lineno} is not a row written by finegrain label revise (no integer 'index'); "
                                "use another --output_file or --overwrite_output", source=str(path), row=len(rows),
                                field="index") from None
            rows.append((lineno, row))
        for lineno, row in rows:
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


def run_revise(cfg: ReviseConfig, reviser: Reviser | None = None) -> ReviseSummary:
    """Revise the rejected responses of ``cfg``'s data set into ``cfg.output_file``, resuming what is there.

    Args:
        cfg: the options.
        reviser: a reviser to use instead of the registered one ``cfg`` names (e.g. an
            :class:`~finegrain.labeling.revisers.HFReviser` on a model already in memory).

    Returns:
        The :class:`ReviseSummary`.

    Raises:
        DataError: a bad input row, or an output file written from other input.
        ConfigError / EndpointError: options (an unregistered ``--reviser``, no data set) or an endpoint that
            cannot work; rows finished so far stay written.
    """
    from tqdm.auto import tqdm

    from finegrain.data.loading import load_rows

    if not cfg.dataset_name:
        raise ConfigError("give --dataset_name, the pairs to revise (the finegrain command fills in the built-in "
                          "world's training pairs when no data set, model or endpoint is given)")
    factory = reviser_factory(cfg.backend) if reviser is None else None  # an unknown name fails before any work
    out = Path(cfg.output_file)
    if out.resolve() == Path(cfg.dataset_name).resolve():
        raise ConfigError(f"--output_file {out} is the input file: choose another path")
    template = read_prompt_template(cfg.prompt_template) if cfg.prompt_template else None
    rows = load_rows(cfg.dataset_name, cfg.dataset_split)
    n_rows = len(rows)
    if cfg.limit is not None:
        rows = rows.head(cfg.limit)
    invalid: collections.Counter = collections.Counter()
    jobs = load_jobs(rows, template=template, skip_invalid=cfg.skip_invalid_rows, skipped=invalid)
    if cfg.overwrite_output:
        for p in (out, unchanged_path(out)):
            p.unlink(missing_ok=True)
    done = _done_indices(out, {j.index: j for j in jobs}, n_rows)
    todo = [j for j in jobs if j.index not in done]
    summary = ReviseSummary(str(out), total=len(rows), skipped=len(jobs) - len(todo), invalid=sum(invalid.values()),
                            keep_unchanged=cfg.keep_unchanged)
    if not todo:
        return summary
    reviser = reviser or factory(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc="revise", unit="row", disable=cfg.disable_tqdm, dynamic_ncols=True)
    side = None  # the side file, opened at the first unchanged row
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
    return summary


def _append(f: Any, row: dict[str, Any]) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()


# --------------------------------------------------------------------------------------------- built-in backends


def make_reviser(cfg: ReviseConfig) -> Reviser:
    """The reviser ``cfg`` asks for (``cfg.backend``), built by its registered factory."""
    return reviser_factory(cfg.backend)(cfg)


def _hf(cfg: ReviseConfig) -> HFReviser:
    """``--reviser hf``: load ``--model_name_or_path`` onto ``--device``."""
    from finegrain.models.loading import load_causal_lm, load_tokenizer, resolve_device

    if not cfg.model_name_or_path:
        raise ConfigError("--reviser hf needs --model_name_or_path (a local path or hub id of a chat model)")
    tok = load_tokenizer(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype)
    model.to(resolve_device(cfg.device))
    return HFReviser(model, tok, batch_size=cfg.batch_size, max_new_tokens=cfg.max_tokens,
                     temperature=cfg.temperature, top_p=cfg.top_p, max_retries=cfg.max_retries, seed=cfg.seed)


def _openai(cfg: ReviseConfig) -> OpenAIReviser:
    """``--reviser openai``: the endpoint at ``--base_url``, the key from the variable named by ``--api_key_env``."""
    if not cfg.model:
        raise ConfigError("--reviser openai needs --model, the model name the endpoint serves")
    key = os.environ.get(cfg.api_key_env) or None
    if key is None:
        logger.info("environment variable %s is not set: requests carry no API key", cfg.api_key_env)
    client = ChatCompletionsClient(cfg.base_url or DEFAULT_BASE_URL, api_key=key, api_key_env=cfg.api_key_env,
                                   timeout=cfg.timeout, max_retries=cfg.max_retries, backoff=cfg.retry_backoff)
    return OpenAIReviser(client, cfg.model, concurrency=cfg.concurrency, temperature=cfg.temperature, top_p=cfg.top_p,
                         max_tokens=cfg.max_tokens, max_retries=cfg.max_retries)


register_reviser("hf", _hf, "a local Hugging Face chat model (--model_name_or_path)")
register_reviser("openai", _openai, "an OpenAI-compatible chat-completions endpoint (--base_url, --model; "
                                    "pip install 'finegrain[openai]')")
