"""``finegrain label <sub-command>``: make fine-grained supervision from preference data.

Sub-commands (each in its own module, imported only when it runs; the runners and their help lines are in
:mod:`finegrain.cli.commands`):

* ``revise``: minimal-edit revisions of rejected responses by an LLM (or the built-in world's reviser);
* ``contrastive``: per-token rewards by contrastive prompting (T-REG);
* ``edits``: token labels from revisions by token-level edit alignment (TLCR, minimal-edit token RM).
"""
