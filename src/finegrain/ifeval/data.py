"""The task's data, made from the model itself, stage by stage, each stage resumable and skipped when done.

Layout of a task directory (default ``<cache>/ifeval``; docs/ifeval.md):

```
task.json                  the settings that define the data (a second build with other settings is refused)
prompts/train.jsonl        prompt rows (finegrain.ifeval.prompts); prompts/test.jsonl on unseen topics
samples/train.jsonl        k responses per train prompt from the start model (finegrain.ifeval.sampling)
data/pairs.jsonl           on-policy preference pairs {prompt, chosen, rejected} (TRL conversational format)
data/revisions.jsonl       {prompt, rejected, revised}: rule-based minimal fixes of the rejected responses
data/revision_pairs.jsonl  the revisions as preference pairs {prompt, chosen: revised, rejected}
data/edit_labels.jsonl     token labels from the revisions (`finegrain label edits`, the model's tokenizer)
eval/<name>/samples.jsonl  a policy's greedy responses to the test prompts; eval/<name>/eval.json its scores
data/truth_test.jsonl      exact token truth {prompt, response, labels} of the start model's test responses
```

Every file is written atomically (a temporary name, then a rename), so a file that exists is complete, and a stage
whose file exists is skipped; sampling also resumes inside a stage (finegrain.ifeval.sampling).

**Pairs** (T-REG's on-policy construction, Zhou et al. 2025) and **revisions** as docs/ifeval.md ("Data from the
model itself") describes them: the chosen response has the highest :func:`pair_key`, the rejected the lowest, ties
broken by sample order (the earlier sample wins both roles), equal best and worst keys give no pair, empty responses
are left out; a revision is :func:`finegrain.ifeval.truth.minimal_fix` of a pair's rejected response, left out when
that has no located violation (it fails only content instructions), and may break a content instruction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finegrain.data.files import read_jsonl, write_text
from finegrain.errors import ConfigError, DataError
from finegrain.ifeval.instructions import TOKEN_LOCAL, check_instructions
from finegrain.ifeval.truth import minimal_fix, token_truth, violations

__all__ = ["TaskPaths", "check_task_settings", "load_rows_checked", "make_pairs", "make_revision_pairs",
           "make_revisions", "make_truth", "pair_key"]


def _file(relative: str) -> property:
    return property(lambda self: self.root / relative)


@dataclass(frozen=True)
class TaskPaths:
    """The files of a task directory (see the module docstring)."""

    root: Path
    settings = _file("task.json")
    samples = _file("samples/train.jsonl")
    pairs = _file("data/pairs.jsonl")
    revisions = _file("data/revisions.jsonl")
    revision_pairs = _file("data/revision_pairs.jsonl")
    edit_labels = _file("data/edit_labels.jsonl")
    truth = _file("data/truth_test.jsonl")

    def prompts(self, split: str) -> Path:
        return self.root / "prompts" / f"{split}.jsonl"

    def eval_dir(self, name: str) -> Path:
        return self.root / "eval" / name


def check_task_settings(paths: TaskPaths, settings: dict[str, Any]) -> None:
    """Record the settings the task's data are made with in ``task.json``; refuse a setting that differs from the
    recorded one (settings not recorded yet are added).

    Raises:
        ConfigError: naming each differing setting and what to do.
    """
    old = json.loads(paths.settings.read_text()) if paths.settings.is_file() else {}
    diff = {k: (old[k], v) for k, v in settings.items() if k in old and old[k] != v}
    if diff:
        detail = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ConfigError(f"the task directory {paths.root} was built with other settings ({detail}); use those "
                          "settings, another --task_dir, or delete the directory")
    if not all(k in old for k in settings):
        write_text(paths.settings, json.dumps({**old, **settings}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------------- pairs


def pair_key(response: str, instruction_id_list: Sequence[str], kwargs: Sequence[dict]) -> tuple[int, int]:
    """``(instructions followed (strict), -(located token-local violations))``: higher is better.

    Example:
        >>> pair_key("a, b, c", ["punctuation:no_comma"], [{}])
        (0, -2)
    """
    followed = sum(check_instructions(response, instruction_id_list, kwargs))
    return followed, -len(violations(response, instruction_id_list, kwargs))


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def make_pairs(samples: Sequence[dict], *, source: str | None = None) -> tuple[list[dict], dict[str, int]]:
    """On-policy pairs from sampled responses (rule in the module docstring).

    Args:
        samples: rows with ``key``, ``prompt``, ``instruction_id_list``, ``kwargs`` and ``responses``.
        source: file name for error messages.

    Returns:
        ``(pairs, counts)``: TRL conversational preference rows ``{prompt, chosen, rejected}`` plus ``key``,
        ``chosen_key`` and ``rejected_key`` (the two scores, as lists); counts of ``pairs``, ``ties`` (prompts
        dropped for equal keys) and ``empty`` (empty responses left out).
    """
    pairs, counts = [], {"pairs": 0, "ties": 0, "empty": 0}
    for i, row in enumerate(samples):
        responses = row.get("responses")
        if not isinstance(responses, list):
            raise DataError("missing list of responses", source=source, row=i, field="responses")
        scored = []
        for response in responses:
            if not isinstance(response, str) or not response.strip():
                counts["empty"] += 1
                continue
            scored.append((pair_key(response, row["instruction_id_list"], row["kwargs"]), response))
        if len(scored) < 2:
            continue
        best = max(range(len(scored)), key=lambda j: (scored[j][0], -j))
        worst = min(range(len(scored)), key=lambda j: (scored[j][0], j))
        if scored[best][0] == scored[worst][0]:
            counts["ties"] += 1
            continue
        pairs.append({"prompt": row["prompt"], "chosen": _assistant(scored[best][1]),
                      "rejected": _assistant(scored[worst][1]), "key": row["key"],
                      "chosen_key": list(scored[best][0]), "rejected_key": list(scored[worst][0])})
        counts["pairs"] += 1
    return pairs, counts


# --------------------------------------------------------------------------------------------------- revisions


def _content(messages: Any) -> str:
    return messages if isinstance(messages, str) else messages[-1]["content"]


def make_revisions(pairs: Sequence[dict], prompts_by_key: dict[Any, dict], *,
                   source: str | None = None) -> tuple[list[dict], dict[str, int]]:
    """``{prompt, rejected, revised}`` rows: each pair's rejected response and its minimal rule-based fix.

    Returns:
        ``(rows, counts)``: rows also carry ``key`` and ``fixed`` (the token-local instruction ids that had
        violations); counts of ``revisions``, ``no_violation`` (nothing to fix) and ``unfixable``.
    """
    rows, counts = [], {"revisions": 0, "no_violation": 0, "unfixable": 0}
    for i, pair in enumerate(pairs):
        if pair.get("key") not in prompts_by_key:
            raise DataError(f"key {pair.get('key')!r} is not a prompt of this task", source=source, row=i, field="key")
        prompt_row = prompts_by_key[pair["key"]]
        ids, kwargs = prompt_row["instruction_id_list"], prompt_row["kwargs"]
        try:
            rejected = _content(pair["rejected"])
        except (KeyError, IndexError, TypeError):
            raise DataError("rejected must be a string or a list of messages", source=source, row=i,
                            field="rejected") from None
        found = violations(rejected, ids, kwargs)
        if not found:
            counts["no_violation"] += 1
            continue
        try:
            revised = minimal_fix(rejected, ids, kwargs)
        except DataError:
            revised = ""
        if not revised.strip():  # no fix, or one that deletes the whole response
            counts["unfixable"] += 1
            continue
        rows.append({"prompt": pair["prompt"], "rejected": _assistant(rejected), "revised": _assistant(revised),
                     "key": pair["key"], "fixed": sorted({v.instruction_id for v in found})})
        counts["revisions"] += 1
    return rows, counts


def make_revision_pairs(revisions: Sequence[dict]) -> list[dict]:
    """The revisions as preference pairs: ``{prompt, chosen: revised, rejected, key}`` (TRL conversational rows).

    A minimal-edit pair: the two responses differ only on the violating characters, so a preference loss on it
    sees exactly what the fix changed (Xu et al. 2024 train a token-level reward model on such edits; here the
    same pairs also serve the sequence-level and token-level preference losses).
    """
    return [{"prompt": r["prompt"], "chosen": r["revised"], "rejected": r["rejected"], "key": r.get("key")}
            for r in revisions]


# ------------------------------------------------------------------------------------------------------- truth


def make_truth(samples: Sequence[dict], tokenizer, *, source: str | None = None) -> tuple[list[dict], dict[str, int]]:
    """Token truth rows ``{prompt, response, labels, violations, key}`` for every non-empty response to a prompt
    with a token-local instruction (:func:`finegrain.ifeval.truth.token_truth`).

    ``labels`` has one integer per token of ``tokenizer`` for the response tokenized alone without special tokens
    (as :func:`finegrain.data.tokenize_response` does; the data layer gives the appended EOS no label), so the rows
    are read by ``finegrain eval --token_credit ... --credit_data`` with this tokenizer. ``violations`` keeps the
    character spans (``start``, ``end``, ``instruction_id``), which any tokenizer can map.
    """
    from finegrain.data import tokenize_response

    rows, counts = [], {"rows": 0, "negative_tokens": 0, "positive_tokens": 0, "neutral_tokens": 0}
    for row, sample in enumerate(samples):
        for field in ("prompt", "instruction_id_list", "kwargs", "responses", "key"):
            if field not in sample:
                raise DataError(f"missing field '{field}'", source=source, row=row, field=field)
        ids, kwargs = sample["instruction_id_list"], sample["kwargs"]
        if not any(i in TOKEN_LOCAL for i in ids):
            continue
        for response in sample["responses"]:
            if not isinstance(response, str):
                raise DataError(f"a response is {type(response).__name__}, not a string", source=source, row=row,
                                field="responses")
            if not response.strip():
                continue
            found = violations(response, ids, kwargs)
            _, offsets, n_text = tokenize_response(tokenizer, response, add_eos=False)
            labels = token_truth(response, offsets[:n_text], found)
            rows.append({"prompt": sample["prompt"], "response": response, "labels": labels,
                         "violations": [asdict(v) for v in found], "key": sample["key"]})
            counts["rows"] += 1
            counts["negative_tokens"] += labels.count(-1)
            counts["positive_tokens"] += labels.count(1)
            counts["neutral_tokens"] += labels.count(0)
    return rows, counts


def load_rows_checked(path: Path, what: str) -> list[dict]:
    """Rows of a stage's input file, or a :class:`ConfigError` naming the stage that writes it."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `finegrain ifeval {what}` first (or `finegrain ifeval build`)")
    return read_jsonl(path)

