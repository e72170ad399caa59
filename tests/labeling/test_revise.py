"""``finegrain label revise``: the reviser prompt and reply parsing, the chat-completions client (the openai SDK)
against a local server on 127.0.0.1 (retries, fatal errors, concurrency, the key), resumable output, bad input, the
registry of revisers and the Hugging Face reviser. Nothing leaves the machine. The world's rule reviser is tested
with the world (tests/world/test_reviser_backend.py)."""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from finegrain.cli.commands import label as label_main
from finegrain.config import build
from finegrain.errors import ConfigError, DataError
from finegrain.labeling.revise import ReviseConfig, make_reviser, run_revise, unchanged_path
from finegrain.labeling.revisers import (
    MARKER,
    ChatCompletionsClient,
    EndpointError,
    HFReviser,
    build_messages,
    conversation_text,
    parse_revision,
    register_reviser,
    registered_revisers,
)

KEY = "sk-test-0123456789abcdef"
_REJECTED = re.compile(r"\[Response(?: B)?\]\n(.*?)\n\nFirst,", re.S)


# ------------------------------------------------------------------------------------------- a fake endpoint


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up early (the SDK does after a fatal status) costs the handler a BrokenPipeError, which
    the stock server prints as a traceback to stderr -- into the output a test checks for tracebacks."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeEndpoint:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 in a thread.

    It revises a response by replacing "bad" with "good". Rows whose rejected response contains ``flaky`` get a
    429 then a 500 before an answer; ``nomarker`` rows never get the marker; ``same`` rows come back unchanged;
    ``slow`` rows wait ``slow_s`` seconds on their first request; ``toolong`` rows get a 400; ``cutoff`` replies
    end with finish_reason "length". After ``die_after`` answers the server
    fails every request with 500. With ``key`` set, a request without ``Bearer <key>`` gets 401.
    """

    def __init__(self, key: str | None = KEY, die_after: int | None = None, slow_s: float = 0.0, delay_s: float = 0.0):
        self.key, self.die_after, self.slow_s, self.delay_s = key, die_after, slow_s, delay_s
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.tries: dict[str, int] = {}
        self.answered = 0
        self.in_flight = self.max_in_flight = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    status, payload, headers = endpoint.respond(self.path, self.headers.get("Authorization"), body)
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def respond(self, path: str, auth: str | None, body: dict):
        with self.lock:
            self.requests.append({"path": path, "auth": auth, "body": body})
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}, {}
        if self.key is not None and auth != f"Bearer {self.key}":
            return 401, {"error": {"message": "invalid api key"}}, {}
        user = body["messages"][-1]["content"]
        rejected = _REJECTED.search(user).group(1)
        with self.lock:
            k = self.tries[rejected] = self.tries.get(rejected, 0) + 1
            dead = self.die_after is not None and self.answered >= self.die_after
        if dead:
            return 500, {"error": {"message": "server is down"}}, {}
        if "flaky" in rejected and k == 1:
            return 429, {"error": {"message": "rate limited"}}, {"Retry-After": "0"}
        if "flaky" in rejected and k == 2:
            return 500, {"error": {"message": "overloaded"}}, {}
        if "toolong" in rejected:
            return 400, {"error": {"message": "this request exceeds the context length"}}, {}
        if "slow" in rejected and k == 1:
            time.sleep(self.slow_s)
        time.sleep(self.delay_s)
        if "nomarker" in rejected:
            content = "Response B is fine as it is."
        elif "same" in rejected:
            content = f"Nothing to change.\n{MARKER}\n{rejected}"
        else:
            content = f"Response B says bad things.\n{MARKER}\n{rejected.replace('bad', 'good')}\n"
        with self.lock:
            self.answered += 1
        finish = "length" if "cutoff" in rejected else "stop"
        answer = {"id": "x", "object": "chat.completion", "model": body["model"],
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                               "finish_reason": finish}]}
        return 200, answer, {}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("FG_TEST_KEY", KEY)


def _pairs(path: Path, responses: list[str], **extra) -> Path:
    rows = [{"id": f"ex{i}", "prompt": f"question {i} ?", "chosen": f"a good answer {i} .", "rejected": f" {r} {i} .",
             **extra} for i, r in enumerate(responses)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(data: Path, out: Path, endpoint: FakeEndpoint, **kw) -> ReviseConfig:
    values = dict(dataset_name=str(data), output_file=str(out), base_url=endpoint.base_url, model="tiny-reviser",
                  api_key_env="FG_TEST_KEY", retry_backoff=0.0, max_retries=3, disable_tqdm=True)
    values.update(kw)
    return build(ReviseConfig, values)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------- prompt and reply


def test_parse_revision_takes_the_text_after_the_last_marker():
    assert parse_revision(f"why\n{MARKER}\n It is cold. \n") == "It is cold."
    assert parse_revision(f"I will print {MARKER} then the text.\n{MARKER}\nfinal") == "final"
    assert parse_revision("no marker here") is None
    assert parse_revision(f"explanation\n{MARKER}\n   \n") is None


def test_reviser_messages_follow_the_spec_prompt_and_keep_braces():
    msgs = build_messages("What is {x}?", " it is {bad} .", "it is {good} .")
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "[Response A]\nit is {good} ." in user and "[Response B]\nit is {bad} ." in user
    assert "What is {x}?" in user and MARKER in user
    assert user.index("explain") < user.index("fewest possible edits") < user.index(MARKER)
    alone = build_messages("q", "r", None)[1]["content"]
    assert "Response A" not in alone and "[Response]\nr" in alone and MARKER in alone
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert conversation_text(conv) == "System: be brief\n\nUser: hi"
    assert conversation_text([{"role": "user", "content": "hi"}]) == "hi"


# ------------------------------------------------------------------------------------------- OpenAI endpoint


def test_endpoint_revisions_retries_counts_and_key(tmp_path, capsys):
    data = _pairs(tmp_path / "pairs.jsonl", ["a bad answer", "flaky bad answer", "nomarker bad", "same answer",
                                             "another bad one", "flaky and bad"])
    out = tmp_path / "out" / "revisions.jsonl"
    with FakeEndpoint() as ep:
        summary = run_revise(_cfg(data, out, ep, concurrency=3, max_retries=2))
    assert (summary.revised, summary.unchanged, summary.failed, summary.skipped) == (4, 1, 1, 0)
    assert dict(summary.failures) == {"reply without the marker": 1}
    assert ep.tries["nomarker bad 2 ."] == 3  # the first try and max_retries=2 more
    assert ep.tries["flaky bad answer 1 ."] == 3  # 429, 500, then the answer
    rows = sorted(_read(out), key=lambda r: r["index"])
    assert [r["index"] for r in rows] == [0, 1, 4, 5]
    first = rows[0]
    assert list(first) == ["index", "id", "prompt", "rejected", "revised", "chosen"]
    assert first == {"index": 0, "id": "ex0", "prompt": "question 0 ?", "rejected": " a bad answer 0 .",
                     "revised": " a good answer 0 .", "chosen": "a good answer 0 ."}  # leading space kept
    assert _read(unchanged_path(out)) == [{"index": 3, "rejected": " same answer 3 ."}]
    assert all(r["auth"] == f"Bearer {KEY}" for r in ep.requests)
    assert all(r["body"]["model"] == "tiny-reviser" and r["body"]["temperature"] == 0.0 for r in ep.requests)
    assert KEY not in out.read_text() and KEY not in unchanged_path(out).read_text()
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err and KEY not in str(summary)
    from finegrain.data.schema import validate_rows

    assert [r["revised"] for r in validate_rows(str(out), "revision")] == [r["revised"] for r in _read(out)]


def test_resume_after_the_server_dies_loses_and_repeats_nothing(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", [f"bad answer number {i}" for i in range(7)])
    out = tmp_path / "revisions.jsonl"
    with FakeEndpoint(die_after=3) as ep:
        first = run_revise(_cfg(data, out, ep, concurrency=1, max_retries=1))
    assert (first.revised, first.failed) == (3, 4) and first.failures == {"HTTP 500 after 2 tries": 4}
    assert sorted(r["index"] for r in _read(out)) == [0, 1, 2]
    with out.open("a") as f:  # a writer killed in the middle of a line
        f.write('{"index": 5, "prompt": "quest')
    with FakeEndpoint() as ep:
        second = run_revise(_cfg(data, out, ep, concurrency=2))
        again = run_revise(_cfg(data, out, ep, concurrency=2))
    assert (second.revised, second.skipped, second.failed) == (4, 3, 0)
    assert sorted(ep.tries) == sorted(f"bad answer number {i} {i} ." for i in range(3, 7))  # done rows not asked
    assert (again.revised, again.skipped) == (0, 7)
    indices = [r["index"] for r in _read(out)]
    assert sorted(indices) == list(range(7))  # all present, none twice
    assert all(r["revised"] == r["rejected"].replace("bad", "good") for r in _read(out))


def test_limit_then_rerun_with_concurrency_completes_the_output(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", [f"bad {i}" for i in range(12)])
    out = tmp_path / "revisions.jsonl"
    with FakeEndpoint(delay_s=0.05) as ep:
        part = run_revise(_cfg(data, out, ep, limit=5, concurrency=4))
        rest = run_revise(_cfg(data, out, ep, concurrency=4))
    assert (part.revised, part.total) == (5, 5)
    assert (rest.revised, rest.skipped, rest.total) == (7, 5, 12)
    assert ep.max_in_flight > 1  # requests really overlapped
    assert sorted(r["index"] for r in _read(out)) == list(range(12))
    assert len(ep.requests) == 12


def test_client_errors_and_cut_off_replies_fail_the_row_only(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", ["toolong bad", "cutoff bad", "same", "bad one"])
    template = tmp_path / "reviser.txt"
    template.write_text(f"Fix it.\n[Response B]\n{{rejected}}\n\nFirst, think. Then print {MARKER} and the fix.")
    out = tmp_path / "revisions.jsonl"
    with FakeEndpoint() as ep:
        summary = run_revise(_cfg(data, out, ep, keep_unchanged=True, prompt_template=str(template), max_retries=1))
    assert (summary.revised, summary.unchanged, summary.failed) == (1, 1, 2)
    assert dict(summary.failures) == {"HTTP 400": 1, "reply cut off at max_tokens": 1}
    assert ep.tries["toolong bad 0 ."] == 1 and ep.tries["cutoff bad 1 ."] == 2  # a 400 is not asked again
    assert ep.requests[0]["body"]["messages"][-1]["content"].startswith("Fix it.")
    rows = {r["index"]: r for r in _read(out)}
    assert sorted(rows) == [2, 3] and rows[2]["revised"] == rows[2]["rejected"]  # unchanged kept on request
    assert not unchanged_path(out).exists()
    bad = tmp_path / "bad.txt"
    bad.write_text("{rejected} without the marker")
    with pytest.raises(ConfigError, match="marker"):
        run_revise(_cfg(data, out, ep, prompt_template=str(bad)))


def test_timeout_is_retried(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", ["slow bad answer"])
    out = tmp_path / "revisions.jsonl"
    with FakeEndpoint(slow_s=3.0) as ep:
        summary = run_revise(_cfg(data, out, ep, timeout=0.5, max_retries=3))
    assert summary.revised == 1 and ep.tries["slow bad answer 0 ."] >= 2  # the first try timed out


def test_fatal_endpoint_errors_name_the_endpoint_and_what_to_check(tmp_path, capsys):
    data = _pairs(tmp_path / "pairs.jsonl", ["bad one", "bad two"])
    out = tmp_path / "revisions.jsonl"
    with FakeEndpoint(key="another-key") as ep:
        with pytest.raises(EndpointError, match=r"HTTP 401.*FG_TEST_KEY") as err:
            run_revise(_cfg(data, out, ep))
        assert KEY not in str(err.value) and ep.base_url in str(err.value)
        with pytest.raises(EndpointError, match=r"404.*--base_url.*--model"):
            run_revise(_cfg(data, out, ep, base_url=ep.base_url + "/wrong"))
        # through the command line: one message, no traceback, exit status 1
        from finegrain.cli.main import main as cli_main

        rc = cli_main(["label", "revise", "--dataset_name", str(data), "--output_file", str(out), "--base_url",
                       ep.base_url, "--model", "m", "--api_key_env", "FG_TEST_KEY", "--disable_tqdm"])
        err_text = capsys.readouterr().err
        assert rc == 1 and "HTTP 401" in err_text and "Traceback" not in err_text and KEY not in err_text
    port = ep.server.server_address[1]  # closed now
    with pytest.raises(EndpointError, match="cannot reach"):
        run_revise(_cfg(data, out, ep, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0))
    assert not out.exists() or out.read_text() == ""


def test_client_sends_no_key_when_the_variable_is_unset(tmp_path):
    with FakeEndpoint(key=None) as ep:
        client = ChatCompletionsClient(ep.base_url + "/chat/completions/", api_key=None)
        msgs = build_messages("q", " bad answer .", None)
        content, finish = client.complete(msgs, model="m", max_tokens=7)
    assert client.url == ep.base_url + "/chat/completions" and "set" not in repr(client)
    assert parse_revision(content) == "good answer ." and finish == "stop"
    assert ep.requests[0]["auth"] is None and ep.requests[0]["body"]["max_tokens"] == 7


def test_only_the_named_variable_is_read_for_the_key(tmp_path, monkeypatch):
    """The SDK would read OPENAI_API_KEY on its own; the reviser sends the key of --api_key_env or none."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-this-one")
    monkeypatch.delenv("FG_UNSET_KEY", raising=False)
    data = _pairs(tmp_path / "pairs.jsonl", ["bad answer"])
    with FakeEndpoint(key=None) as ep:
        summary = run_revise(_cfg(data, tmp_path / "out.jsonl", ep, api_key_env="FG_UNSET_KEY"))
    assert summary.revised == 1 and [r["auth"] for r in ep.requests] == [None]


def test_endpoint_reviser_without_the_openai_package_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` raises ImportError
    data = _pairs(tmp_path / "pairs.jsonl", ["bad answer"])
    cfg = build(ReviseConfig, dict(dataset_name=str(data), output_file=str(tmp_path / "out.jsonl"), model="m",
                                   base_url="http://127.0.0.1:9/v1", disable_tqdm=True))
    with pytest.raises(ConfigError, match=re.escape("pip install 'finegrain[openai]'")):
        run_revise(cfg)
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


# ------------------------------------------------------------------------------------- input and options


def test_conversational_rows_are_reduced_to_text_and_kept_as_messages(tmp_path):
    prompt = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "how are you ?"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "fine , thanks ."}],
           "rejected": [{"role": "assistant", "content": "bad , go away ."}], "prompt_id": 7}
    data = tmp_path / "conv.jsonl"
    data.write_text(json.dumps(row) + "\n")
    out = tmp_path / "revisions.jsonl"
    with FakeEndpoint() as ep:
        run_revise(_cfg(data, out, ep))
    user = ep.requests[0]["body"]["messages"][-1]["content"]
    assert "System: be kind\n\nUser: how are you ?" in user and "[Response B]\nbad , go away ." in user
    (written,) = _read(out)
    assert written["prompt"] == prompt and written["prompt_id"] == 7
    assert (written["rejected"], written["revised"], written["chosen"]) == ("bad , go away .", "good , go away .",
                                                                            "fine , thanks .")


def test_rows_without_chosen_and_implicit_prompts(tmp_path):
    data = tmp_path / "nochosen.jsonl"
    data.write_text(json.dumps({"prompt": "q ?", "rejected": "bad reply ."}) + "\n")
    implicit = tmp_path / "implicit.jsonl"
    implicit.write_text(json.dumps({"chosen": "Q: sky ?\n\nA: blue .", "rejected": "Q: sky ?\n\nA: bad ."}) + "\n")
    with FakeEndpoint() as ep:
        a = run_revise(_cfg(data, tmp_path / "a.jsonl", ep))
        b = run_revise(_cfg(implicit, tmp_path / "b.jsonl", ep))
    assert a.revised == b.revised == 1
    assert "Response A" not in ep.requests[0]["body"]["messages"][-1]["content"]
    assert _read(tmp_path / "a.jsonl") == [{"index": 0, "prompt": "q ?", "rejected": "bad reply .",
                                            "revised": "good reply ."}]
    (row,) = _read(tmp_path / "b.jsonl")
    assert (row["prompt"], row["rejected"], row["revised"]) == ("Q: sky ?\n\nA:", " bad .", " good .")


def test_bad_rows_name_file_row_and_field(tmp_path):
    data = tmp_path / "bad.jsonl"
    rows = [{"prompt": "q", "chosen": "c .", "rejected": "bad ."}, {"prompt": "q", "chosen": "c .", "rejected": "  "}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with FakeEndpoint() as ep:
        with pytest.raises(DataError) as err:
            run_revise(_cfg(data, tmp_path / "out.jsonl", ep))
        assert (err.value.source, err.value.row, err.value.field) == (str(data), 1, "rejected")
        summary = run_revise(_cfg(data, tmp_path / "out.jsonl", ep, skip_invalid_rows=True))
    assert (summary.revised, summary.invalid) == (1, 1)
    no_rejected = tmp_path / "norej.jsonl"
    no_rejected.write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n")
    with pytest.raises(DataError, match="missing column 'rejected'"):
        run_revise(build(ReviseConfig, dict(dataset_name=str(no_rejected), output_file=str(tmp_path / "o.jsonl"),
                                            model="m")))


def test_output_of_another_data_set_is_refused(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", ["bad a", "bad b"])
    out = tmp_path / "revisions.jsonl"
    out.write_text(json.dumps({"index": 1, "prompt": "x", "rejected": "something else", "revised": "y"}) + "\n")
    with FakeEndpoint() as ep:
        with pytest.raises(DataError, match="another data set") as err:
            run_revise(_cfg(data, out, ep))
        assert err.value.source == str(out)
        summary = run_revise(_cfg(data, out, ep, overwrite_output=True))
    assert summary.revised == 2 and len(_read(out)) == 2


@pytest.mark.parametrize(
    "values, message",
    [
        ({"dataset_name": "d.jsonl"}, "needs an LLM reviser"),
        ({"dataset_name": "d.jsonl", "reviser": "openai"}, "--model"),
        ({"dataset_name": "d.jsonl", "reviser": "hf"}, "--model_name_or_path"),
        ({"reviser": " "}, "needs a name"),
        ({"model": "m", "api_key_env": KEY}, "NAME of the environment variable"),
        ({"model": "m", "dataset_name": "d.jsonl", "concurrency": 0}, "concurrency"),
        ({"model": "m"}, "--dataset_name"),
    ],
)
def test_bad_options_say_what_to_change(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        build(ReviseConfig, {"output_file": "o.jsonl", **values})
    assert KEY not in str(err.value)


def test_output_file_is_required_and_backend_inferred():
    with pytest.raises(ConfigError, match="output_file"):
        build(ReviseConfig, {})
    assert build(ReviseConfig, {"output_file": "o", "dataset_name": "d", "reviser": "mine"}).backend == "mine"
    assert build(ReviseConfig, {"output_file": "o", "dataset_name": "d", "model_name_or_path": "p"}).backend == "hf"
    cfg = build(ReviseConfig, {"output_file": "o", "dataset_name": "d", "model": "m", "max_new_tokens": 9})
    assert cfg.backend == "openai" and cfg.max_tokens == 9


# ------------------------------------------------------------------------------------------- reviser registry


class _Shout:
    """A rule reviser for the registry tests: upper-cases the rejected response (``same`` rows stay as they are)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def run(self, jobs):
        for job in jobs:
            yield job, (job.rejected if "same" in job.rejected else job.rejected.upper()), None


def test_a_registered_reviser_runs_by_name(tmp_path, monkeypatch):
    from finegrain.labeling import revisers

    monkeypatch.setattr(revisers, "_REGISTRY", dict(revisers._REGISTRY))  # registrations end with the test
    assert {"hf", "openai"} <= set(registered_revisers())
    register_reviser("shout", _Shout, "upper-cases the response")
    assert "shout" in registered_revisers() and "shout: upper-cases" in revisers.describe_revisers()
    data = _pairs(tmp_path / "pairs.jsonl", ["bad answer", "same answer"])
    out = tmp_path / "out.jsonl"
    cfg = build(ReviseConfig, {"dataset_name": str(data), "output_file": str(out), "reviser": "shout",
                               "max_edits": 2, "disable_tqdm": True})
    summary = run_revise(cfg)
    assert (summary.revised, summary.unchanged, summary.failed) == (1, 1, 0)
    assert _read(out) == [{"index": 0, "id": "ex0", "prompt": "question 0 ?", "rejected": " bad answer 0 .",
                           "revised": " BAD ANSWER 0 .", "chosen": "a good answer 0 ."}]
    assert make_reviser(cfg).cfg is cfg  # the factory gets the config
    with pytest.raises(ValueError, match="plain word"):
        register_reviser("a b", _Shout)


def test_an_unknown_reviser_is_refused_with_the_registered_names_before_any_work(tmp_path):
    data = _pairs(tmp_path / "pairs.jsonl", ["bad answer"])
    out = tmp_path / "out.jsonl"
    cfg = build(ReviseConfig, {"dataset_name": str(data), "output_file": str(out), "reviser": "nope"})
    with pytest.raises(ConfigError, match=r"--reviser 'nope' is not a registered reviser; registered: .*hf.*openai"):
        run_revise(cfg)
    assert not out.exists()
    with pytest.raises(ConfigError, match="give --dataset_name"):  # nothing to revise (the world fills this in)
        run_revise(build(ReviseConfig, {"output_file": str(out)}))


# ---------------------------------------------------------------------------------------- Hugging Face reviser


CHAT_TEMPLATE = ("{% for m in messages %}<| {{ m['role'] }} |> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<| assistant |>{% endif %}")


def _tiny_chat_model():
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "<|", "|>", "system", "user", "assistant", "bad", "good", "answer",
             "question", "?", ".", "Response", "B", "A", "[", "]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                        pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_hf_reviser_goes_through_the_chat_template_and_counts_failures(tmp_path):
    model, tokenizer = _tiny_chat_model()
    seen: list[str] = []
    generate = model.generate

    def spy(**kwargs):
        seen.extend(tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=True))
        assert kwargs["do_sample"] is True and kwargs["max_new_tokens"] == 4
        return generate(**kwargs)

    model.generate = spy
    data = _pairs(tmp_path / "pairs.jsonl", ["bad answer"] * 3)
    cfg = build(ReviseConfig, {"dataset_name": str(data), "output_file": str(tmp_path / "out.jsonl"),
                               "model_name_or_path": "in-memory", "max_tokens": 4, "temperature": 1.0,
                               "max_retries": 1, "batch_size": 2, "disable_tqdm": True})
    reviser = HFReviser(model, tokenizer, batch_size=2, max_new_tokens=4, temperature=1.0, max_retries=1)
    summary = run_revise(cfg, reviser)
    assert (summary.revised, summary.unchanged, summary.failed) == (0, 0, 3)
    assert sum(summary.failures.values()) == 3
    assert set(summary.failures) <= {"reply without the marker", "reply cut off at max_tokens"}
    assert len(seen) == 6  # every row tried once more (sampling, max_retries=1)
    rendered = reviser.render(build_messages("question ?", "bad answer", "good answer"))
    assert rendered.startswith("<| system |>") and rendered.endswith("<| assistant |>")
    assert all(s.startswith("<| system |>") and s.rstrip().endswith("<| assistant |>") for s in seen)
    assert not (tmp_path / "out.jsonl").exists() or _read(tmp_path / "out.jsonl") == []


def test_hf_reviser_from_disk_through_the_command(tmp_path, capsys):
    model, tokenizer = _tiny_chat_model()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = _pairs(tmp_path / "pairs.jsonl", ["bad answer", "bad question"])
    rc = label_main(["revise", "--dataset_name", str(data), "--output_file", str(tmp_path / "out.jsonl"),
                     "--model_name_or_path", str(tmp_path / "model"), "--max_new_tokens", "3", "--device", "cpu",
                     "--disable_tqdm"])
    out = capsys.readouterr().out
    assert rc == 0 and "0 revised" in out and "2 failed" in out and "run the same command again" in out
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        HFReviser(model, tokenizer)


# ------------------------------------------------------------------------------------------- label dispatcher


def test_docs_show_the_reviser_prompt_as_it_is():
    from finegrain.labeling.revisers import REVISER_PROMPT, REVISER_SYSTEM

    doc = (Path(__file__).parents[2] / "docs" / "labeling.md").read_text()
    assert REVISER_PROMPT in doc and " ".join(REVISER_SYSTEM.split()) in " ".join(doc.split())
    assert all(f"## `finegrain label {name}`" in doc for name in ("revise", "contrastive", "edits"))


def test_docs_adding_a_reviser_runs_as_written(tmp_path, monkeypatch):
    from finegrain.labeling import revisers

    monkeypatch.setattr(revisers, "_REGISTRY", dict(revisers._REGISTRY))
    doc = (Path(__file__).parents[2] / "docs" / "labeling.md").read_text()
    section = doc[doc.index("### Adding a reviser"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]
    exec(compile(code, "docs/labeling.md", "exec"), {})
    data = _pairs(tmp_path / "pairs.jsonl", ["A Bad Answer"])
    summary = run_revise(build(ReviseConfig, {"dataset_name": str(data), "output_file": str(tmp_path / "o.jsonl"),
                                              "reviser": "lowercase", "disable_tqdm": True}))
    assert summary.revised == 1 and _read(tmp_path / "o.jsonl")[0]["revised"] == " a bad answer 0 ."


def test_label_dispatcher_lists_sub_commands_and_refuses_unknown_ones(capsys):
    assert label_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"  {name}" in text for name in ("revise", "contrastive", "edits"))
    assert label_main(["revize"]) == 2
    assert "did you mean 'revise'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        label_main(["revise", "--help"])
    assert "--api_key_env" in capsys.readouterr().out
