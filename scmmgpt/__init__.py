"""The applications on top of the library: the `scmmgpt` command (`scmmgpt.cli`), the demo, the paper's evaluation
and the demo's figures.

Layers, each importing only those below it (checked by `lint-imports`, configured in `.importlinter`):

1. `scmmgpt` (this package): command line, demo, evaluation, plots;
2. `trainers`: data builders and the three training stages;
3. `modeling_scmmgpt`: configs, models, processors, pipelines, gene vocabularies, ontology text, prompt phrasings.
"""
