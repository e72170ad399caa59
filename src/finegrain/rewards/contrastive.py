"""Contrastive-prompting token rewards (T-REG): the pure maths, the prompt templates and the reward source.

The functions (:func:`contrastive_token_rewards`, :func:`implicit_token_rewards`, :func:`squash_to_half`) are pure
tensor maths: each returns a ``(B, T)`` tensor in the response layout, exactly 0 where the mask is False, and
**detached**: token rewards are targets (T-REG regularises towards them, PPO adds them to returns), so no gradient
ever flows into whatever produced them.

:class:`ContrastiveTemplate` wraps a prompt into the opposite prompts ``P+`` / ``P−`` (control prefix, system
prompt or draft-revision form), and :class:`ContrastiveRewardSource` runs the two templated forward passes of a
scorer model and returns :class:`~finegrain.types.TokenRewards`. ``finegrain label contrastive`` and
``finegrain po --loss treg-* --reg_source contrastive`` use them.
"""

from __future__ import annotations

import re

import torch

from finegrain.ops.masked import zero_masked

__all__ = [
    "CONTRASTIVE_FORMS",
    "DRAFT_REQUEST",
    "ContrastiveRewardSource",
    "ContrastiveTemplate",
    "contrastive_token_rewards",
    "implicit_token_rewards",
    "resolve_template",
    "squash_to_half",
]


def squash_to_half(values: torch.Tensor) -> torch.Tensor:
    """Map any real token score into T-REG's reward range: ``σ(x) − ½ ∈ (−½, ½)``.

    This is the map that contrastive prompting applies to its log-prob difference (T-REG: Zhou et al., ACL 2025,
    arXiv 2412.02685; docs/methods/treg.md), so feeding another source's scores through it (a token RM's ``r_φ``, a
    discriminator's logit, an implicit DPO reward) puts them on the same scale: sign-preserving, ``0 ↦ 0``, slope ¼
    at 0, bounded, so one ``α`` means the same for every source. It is not linear: a source already bounded in
    ``(−1, 1)`` (e.g. TLCR's ``2·P(+) − 1``) keeps its proportions better with a linear ``r/2`` (our suggestion, not
    in the paper; docs/methods/treg.md). Computed as ``½·tanh(x/2)``, the same function without the cancellation in
    ``σ(x) − ½`` near 0.

    Args:
        values: float tensor of any shape.

    Returns:
        Tensor of the same shape and dtype, detached.

    Example:
        >>> squash_to_half(torch.tensor([0.0, 2.0, -50.0]))
        tensor([ 0.0000,  0.3808, -0.5000])
    """
    return 0.5 * torch.tanh(0.5 * values.detach())


def contrastive_token_rewards(logp_plus: torch.Tensor, logp_minus: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """T-REG's self-generated token rewards from contrastive prompting (Zhou et al., ACL 2025, arXiv 2412.02685).

    ``r̂_t = (σ(log π_ref(y_t | P+(x), y_<t) − log π_ref(y_t | P−(x), y_<t)) − ½) · m_t``

    where ``P+`` asks for a better answer and ``P−`` for a worse one, both scoring the same response tokens
    (docs/methods/treg.md).

    Args:
        logp_plus: ``(B, T)`` token log-probs of the response under the positive prompt.
        logp_minus: ``(B, T)`` token log-probs under the negative prompt.
        mask: ``(B, T)`` bool response mask.

    Returns:
        ``(B, T)`` rewards in ``(−½, ½)``, 0 where ``mask`` is False, detached.

    Example:
        >>> contrastive_token_rewards(torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-3.0, -2.0, 9.0]]),
        ...                           torch.tensor([[True, True, False]]))
        tensor([[0.3808, 0.0000, 0.0000]])
    """
    return zero_masked(squash_to_half(logp_plus - logp_minus), mask)


def implicit_token_rewards(
    token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    token_kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """Implicit token rewards of DPO, ``β ρ_t``, or of TDPO, ``β (ρ_t + K_t)`` (docs/methods/tdpo.md).

    ``ρ_t = ℓ^θ_t − ℓ^ref_t``; ``K_t = KL(π_ref(·|s_t) ‖ π_θ(·|s_t))``. Summed over the response they give the
    sequence rewards that DPO (``β Σ ρ``; Rafailov et al. 2023) and TDPO (``β (M + S)``; Zeng et al., ICML 2024,
    arXiv 2404.11999) log.

    Args:
        token_logps: ``(B, T)`` policy token log-probs.
        ref_token_logps: ``(B, T)`` reference token log-probs.
        mask: ``(B, T)`` bool response mask.
        beta: ``β``.
        token_kl: ``(B, T)`` forward token KL for TDPO's reward, or None for DPO's.

    Returns:
        ``(B, T)`` rewards, 0 where ``mask`` is False, detached.

    Example:
        >>> implicit_token_rewards(torch.tensor([[-1.0, -5.0]]), torch.tensor([[-2.0, -1.0]]),
        ...                        torch.tensor([[True, False]]), beta=0.1)
        tensor([[0.1000, 0.0000]])
    """
    rho = token_logps.detach() - ref_token_logps.detach()
    if token_kl is not None:
        rho = rho + token_kl.detach()
    return zero_masked(beta * rho, mask)


# --------------------------------------------------------------------------------------------- the reward source
# Everything below runs models; it imports torch only at module level (tokenizers and models are duck-typed, and
# finegrain.data / finegrain.models are imported inside the functions that need them).

CONTRASTIVE_FORMS = ("control", "system", "draft")
"""Template forms of :class:`ContrastiveTemplate`."""

_DEFAULT_TEXTS = {
    # A plain instruction before the prompt; applications give their own (the built-in world: the prefixes its SFT
    # model was trained on).
    "control": ("Answer helpfully, correctly, coherently and concisely:",
                "Answer unhelpfully, incorrectly, incoherently and verbosely:"),
    # The four dimensions of T-REG (Zhou et al., ACL 2025); the paper's exact wording is not published, this is ours.
    "system": (
        "You always answer helpfully, correctly, coherently and concisely.",
        "You always answer unhelpfully, incorrectly, incoherently and verbosely.",
    ),
    "draft": (
        "a better answer: more helpful, correct, coherent and concise",
        "a worse answer: unhelpful, incorrect, incoherent and verbose",
    ),
}

DRAFT_REQUEST = (
    "Below is a user request and a draft answer. Rewrite the draft into {goal}.\n\nRequest: {prompt}\n\nDraft: {draft}"
)
"""The user turn of the draft-revision form (our wording, not the paper's; docs/methods/treg.md); ``{goal}`` is the
positive or negative text, unless that text is a whole request of its own (it holds ``{draft}``)."""

_PLACEHOLDER = re.compile(r"\{(prompt|draft)\}")


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


def _prompt_as_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class ContrastiveTemplate:
    """How a prompt ``x`` is wrapped into the opposite prompts ``P+(x)`` and ``P−(x)`` (T-REG; docs/methods/treg.md).

    Forms (``positive`` / ``negative`` replace the form's default texts):

    * ``control``: the prompt under an instruction: ``positive`` / ``negative`` with ``{prompt}`` replaced by ``x``
      (the placeholder may stand anywhere: ``"how do I make {prompt} well"``), or, without a placeholder, a prefix
      ``"{positive} {x}"``. A conversational prompt gets it on its last user turn. (The built-in world passes the
      control prefixes its SFT model was trained on.)
    * ``system``: a system turn ``positive`` / ``negative`` before the conversation, rendered by the tokenizer's
      chat template (an existing system turn keeps its text after ours).
    * ``draft`` (the paper's revision form): a request to rewrite the response ``y`` itself (the draft) into a
      better / worse answer. A text without ``{draft}`` is the goal of :data:`DRAFT_REQUEST`, sent as one user turn
      through the chat template. A text with ``{draft}`` is the whole request in the user's own words, ``{prompt}``
      and ``{draft}`` replaced by ``x`` and ``y`` (``"please improve : {prompt} draft : {draft}"``); it is placed as
      a ``control`` instruction is: a plain-text prompt becomes the plain-text request, a conversation gets it on
      its last user turn (``{prompt}`` is that turn's text). Both texts must then hold ``{draft}``. (The built-in
      world passes the revision requests its SFT model was trained on.)

    The response is then scored as the assistant turn that follows ``P±(x)``: its token ids are appended unchanged
    to the tokenized template, so every reward lines up with one response token.

    Args:
        form: one of :data:`CONTRASTIVE_FORMS`, or ``"auto"`` (the commands' default): ``draft``, the paper's
            revision form (the built-in world's command line sets ``draft`` with the revision requests in
            world words that its SFT model was trained on).
        positive: text of the positive instruction (None: the form's default).
        negative: text of the negative instruction (None: the form's default).
    """

    def __init__(self, form: str = "draft", positive: str | None = None, negative: str | None = None):
        form = "draft" if form == "auto" else form
        if form not in CONTRASTIVE_FORMS:
            raise ValueError(f"contrastive template form must be one of {', '.join(CONTRASTIVE_FORMS)}; got {form!r}")
        default_pos, default_neg = _DEFAULT_TEXTS[form]
        self.form = form
        self.positive = default_pos if positive is None else positive
        self.negative = default_neg if negative is None else negative
        if not self.positive.strip() or not self.negative.strip() or self.positive == self.negative:
            raise ValueError("contrastive template: the positive and negative texts must be non-empty and differ")
        if form == "draft" and ("{draft}" in self.positive) != ("{draft}" in self.negative):
            raise ValueError("contrastive template: in the draft form either both texts are whole requests with "
                             "'{draft}' (and '{prompt}') where the response and the prompt go, or neither is (both are "
                             "goals of the built-in request)")

    @property
    def full_request(self) -> bool:
        """Whether the texts are whole requests (the ``draft`` form with ``{draft}`` placeholders)."""
        return self.form == "draft" and "{draft}" in self.positive

    @property
    def needs_chat_template(self) -> bool:
        """Whether the form renders its prompts through the tokenizer's chat template (``system``, and ``draft``
        with the built-in request)."""
        return self.form == "system" or (self.form == "draft" and not self.full_request)

    def __repr__(self) -> str:
        return f"ContrastiveTemplate(form={self.form!r}, positive={self.positive!r}, negative={self.negative!r})"

    def wrap(self, prompt, response: str | None = None) -> tuple:
        """``(P+(x), P−(x))``, each a string or a list of messages as :func:`finegrain.data.tokenize_prompt` takes.

        Args:
            prompt: the prompt ``x`` (a string or a list of ``{"role", "content"}`` messages).
            response: the response text ``y`` (needed by the ``draft`` form only).

        Returns:
            The two wrapped prompts.
        """
        return self._wrap(prompt, response, self.positive), self._wrap(prompt, response, self.negative)

    def _wrap(self, prompt, response: str | None, text: str):
        if self.form == "system":
            msgs = _messages(prompt)
            if msgs and msgs[0]["role"] == "system":
                msgs[0]["content"] = f"{text}\n\n{msgs[0]['content']}"
                return msgs
            return [{"role": "system", "content": text}] + msgs
        if self.form == "draft" and response is None:
            raise ValueError("the draft form of contrastive prompting needs the response text (the draft)")
        if self.form == "draft" and not self.full_request:
            content = DRAFT_REQUEST.format(goal=text, prompt=_prompt_as_text(prompt), draft=response)
            return [{"role": "user", "content": content}]
        if self.form == "draft":
            def put(x: str) -> str:  # one pass: a prompt or draft holding "{draft}" is not substituted again
                return _PLACEHOLDER.sub(lambda m: x if m.group(1) == "prompt" else response, text)
        else:
            def put(x: str) -> str:
                return text.replace("{prompt}", x) if "{prompt}" in text else f"{text} {x}" if x else text

        if isinstance(prompt, str):
            return put(prompt)
        msgs = _messages(prompt)
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            return [{"role": "user", "content": put("")}] + msgs
        msgs[users[-1]]["content"] = put(msgs[users[-1]]["content"])
        return msgs

    def token_ids(self, tokenizer, prompt, response: str | None = None) -> tuple[list[int], list[int]]:
        """Token ids of ``P+(x)`` and ``P−(x)`` (tokenized as the data layer tokenizes prompts)."""
        from finegrain.data.tokenize import tokenize_prompt

        plus, minus = self.wrap(prompt, response)
        return tokenize_prompt(tokenizer, plus), tokenize_prompt(tokenizer, minus)


class ContrastiveRewardSource:
    """Contrastive-prompting token rewards (T-REG; docs/methods/treg.md) as a :class:`~finegrain.rewards.RewardSource`.

    For each row, the scorer (normally the frozen reference ``π_ref``) reads the same response tokens after
    ``P+(x)`` and after ``P−(x)``, and

    ``r̂_t = σ(log π_ref(y_t | P+(x), y_<t) − log π_ref(y_t | P−(x), y_<t)) − ½``

    (:func:`contrastive_token_rewards`). Inputs are built by concatenating the template's token ids with the batch's
    own response ids (never by re-tokenizing the joined text), so ``values[i, t]`` belongs to
    ``batch.completion_input_ids[i, t]``. Both templated copies of the batch go through one forward pass.

    Args:
        model: the scorer, a causal LM (already built; nothing is loaded here).
        tokenizer: its tokenizer (renders and tokenizes the templates).
        template: a :class:`ContrastiveTemplate`.
        context: optional zero-argument callable returning a context manager to run the scorer in (e.g. a LoRA
            policy's ``disable_adapter``, which makes the policy its own reference).
        chunk_size: response positions per chunk of the output projection.
        autocast: optional zero-argument callable returning the autocast context of a mixed-precision run.
    """

    name = "contrastive"

    def __init__(self, model, tokenizer, template: ContrastiveTemplate, *, context=None, chunk_size: int = 1024,
                 autocast=None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.context, self.chunk_size, self.autocast = context, chunk_size, autocast

    @torch.no_grad()
    def token_rewards(self, batch):
        """Rewards for the ``N`` rows of ``batch`` (a :class:`~finegrain.types.CompletionBatch`).

        The raw prompts are ``batch.prompts`` (strings or message lists; None decodes the batch's prompt block, which
        is exact for plain-text prompts only); the ``draft`` form also reads the response texts (``batch.responses``,
        else decoded from the ids).

        Returns:
            :class:`~finegrain.types.TokenRewards` with ``values (N, T)`` in ``(−½, ½)`` (0 where the mask is False),
            ``mask = completion_mask`` and ``meta`` holding ``logp_plus`` / ``logp_minus`` ``(N, T)``.
        """
        import contextlib
        import dataclasses

        from finegrain.data.collate import collate_completions, pad_token_id
        from finegrain.models.forward import completion_token_logps
        from finegrain.rewards.base import prompt_texts, response_texts
        from finegrain.types import TokenRewards

        ids, mask = batch.completion_input_ids, batch.completion_mask.to(torch.bool)
        n = ids.shape[0]
        prompts = prompt_texts(batch, self.tokenizer)
        responses = response_texts(batch, self.tokenizer) if self.template.form == "draft" else None
        plus, minus = zip(*(self.template.token_ids(self.tokenizer, p, None if responses is None else responses[i])
                            for i, p in enumerate(prompts)))
        rows = [{"prompt_input_ids": list(p), "completion_input_ids": []} for p in plus + minus]
        prompt_block = collate_completions(rows, pad_token_id(self.tokenizer)).to(ids.device)
        # the same response ids under both prompts
        both = dataclasses.replace(prompt_block, completion_input_ids=torch.cat([ids, ids]),
                                   completion_mask=torch.cat([mask, mask]))
        enter = self.context or contextlib.nullcontext
        cast = self.autocast or contextlib.nullcontext
        with enter(), cast():
            logps = completion_token_logps(self.model, both, self.chunk_size).float()
        logp_plus, logp_minus = logps[:n], logps[n:]
        return TokenRewards(
            values=contrastive_token_rewards(logp_plus, logp_minus, mask),
            mask=mask,
            meta={"logp_plus": logp_plus, "logp_minus": logp_minus},
        )


def template_problems(template: ContrastiveTemplate, tokenizer, prompt, response: str,
                      max_unknown_share: float = 0.1) -> list[str]:
    """Why ``template`` would give meaningless rewards with ``tokenizer`` (empty when it looks fine).

    Contrastive rewards compare the scorer's log-probs under ``P+`` and ``P−``; if the text the template adds around
    the prompt is mostly tokens the tokenizer does not know, or if the form needs a chat template the tokenizer lacks
    (its request is then rendered as plain ``"user: ..."`` text the model was never trained on), the two prompts say
    nothing to the model and the rewards are noise (a credit AUROC near chance), without any error.

    Args:
        template: the template.
        tokenizer: the scorer's tokenizer.
        prompt: a prompt to render (a data row's, or a neutral sample).
        response: a response for the ``draft`` form.
        max_unknown_share: the most unknown tokens the template may add, as a share of the tokens it adds.

    Returns:
        One sentence per problem.
    """
    from finegrain.data.tokenize import tokenize_prompt

    problems = []
    if template.needs_chat_template and not getattr(tokenizer, "chat_template", None):
        problems.append(f"the {template.form} form needs a chat template, which this tokenizer lacks (its turns "
                        "would be plain 'user: ...' text the model has never seen)")
    unk = getattr(tokenizer, "unk_token_id", None)
    base = tokenize_prompt(tokenizer, prompt)
    plus, minus = template.token_ids(tokenizer, prompt, response)
    for side, ids in (("positive", plus), ("negative", minus)):
        added = max(1, len(ids) - len(base))
        unknown = (ids.count(unk) - base.count(unk)) if unk is not None else 0
        if unknown > max_unknown_share * added:
            problems.append(f"{unknown} of the {added} tokens the {side} prompt adds are unknown to the tokenizer "
                            f"({tokenizer.unk_token})")
    if plus == minus:
        problems.append("the positive and negative prompts tokenize to the same ids")
    return problems


def checked_template(template: ContrastiveTemplate, tokenizer, prompt="question", response: str = "answer",
                     options=("--contrastive_template", "--contrastive_positive", "--contrastive_negative")
                     ) -> ContrastiveTemplate:
    """``template`` if :func:`template_problems` finds nothing (rendering a data row's ``prompt`` and
    ``response``, or a neutral sample when the caller has none at hand), else a ConfigError that says what to
    pass instead, naming the command's own ``options``: form, positive text, negative text (by default those
    of ``po`` and ``eval``; ``label contrastive`` has ``--template``, ...)."""
    from finegrain.errors import ConfigError

    problems = template_problems(template, tokenizer, prompt, response)
    if problems:
        form, pos, neg = options
        raise ConfigError(
            f"contrastive prompting with {template!r} would give meaningless rewards: {'; '.join(problems)}. Pass "
            f"{form} draft with {pos} / {neg} revision requests in words the model knows, with '{{prompt}}' and "
            "'{draft}' where the prompt and the response go (e.g. 'improve : {prompt} draft : {draft}'), or "
            f"{form} control with {pos} / {neg} instructions such as 'answer well : {{prompt}}', or use a tokenizer "
            "with a chat template"
        )
    return template


resolve_template = ContrastiveTemplate  # the name po, eval and label call it by (with their form "auto")
